#!/usr/bin/env bash
# The runs behind BENCHMARKS.md: securechat and ngircd side by side, each on a fresh server, on
# this machine's loopback. Appends one JSON line per server and run to the file named (default
# benchmarks.jsonl) and prints the tables. Needs ngircd (Debian: apt-get install ngircd) and
# the project installed (pip install .). Takes about 15 minutes on 2 cores.
#
#   scripts/benchmarks.sh [OUT.jsonl]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks.jsonl}
run() {
    echo "== python -m scripts.loadgen $*" >&2
    python -m scripts.loadgen "$@" | tee /dev/stderr | grep '^{' >>"$out"
}

# Fan-out, flat out: 10 senders keep a bounded window of messages in flight.
for n in 50 500 2000 5000; do
    run fanout -n "$n" --senders 10 --duration 10 --target both
done
# Latency at a fixed offered rate.
run fanout -n 1000 --senders 10 --rate 100 --duration 20 --target both
# Idle clients held: logins/s and memory per connection.
run hold -n 10000 --duration 10 --target both
# The most this machine's file-descriptor limit (20,000 a process) leaves room for.
run hold -n 19500 --duration 10 --target both
# Sealed DMs (securechat only: IRC has none).
run dm --pairs 50 --duration 10
# Under attack: legitimate users beside non-readers, a handshake flood and a login flood.
echo "== python -m scripts.loadgen.attack -n 500 --nonreaders 1000 --duration 20" >&2
python -m scripts.loadgen.attack -n 500 --nonreaders 1000 --duration 20 | tee /dev/stderr \
    | grep '^{' >>"$out"
