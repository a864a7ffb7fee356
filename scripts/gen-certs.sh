#!/usr/bin/env bash
# Make or renew securechat's certificates, then check them with `openssl verify`.
#
# A wrapper around `securechat gen-certs` (falls back to `python3 -m securechat` when the
# `securechat` command is not on PATH); every option is passed through unchanged. Files go to
# ./certs unless --out DIR (or SECURECHAT_CERTS_OUT) says otherwise; see certs/README.md.
#
# First-time setup (local CA + a server certificate for localhost, 127.0.0.1 and ::1):
#     scripts/gen-certs.sh
#
# Provisioning a host: add the names and addresses clients will connect to:
#     scripts/gen-certs.sh --host chat.example.org --host 10.0.0.5
#
# Issuing client certificates for mutual TLS (server --require-client-cert), with the same CA:
#     scripts/gen-certs.sh --reuse-ca --force --host chat.example.org --client alice-laptop
#   (server.pem/server.key are issued again too, hence --force; repeat your --host options.)
#
# Renewing the server certificate (or adding a host) without replacing the CA, so every client's
# ca.pem keeps working:
#     scripts/gen-certs.sh --reuse-ca --force --host chat.example.org --host 10.0.0.5
#   (list every --host again: the new certificate names only localhost and what you pass.)
#
# Checking the result by hand (this script does it for you when openssl is installed):
#     cd certs && openssl verify -CAfile ca.pem server.pem
#
# Other options: --days N (validity of server/client certificates), --help.
# Existing files are never overwritten without --force.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if command -v securechat >/dev/null 2>&1; then
    securechat=(securechat)
else
    securechat=("${PYTHON:-python3}" -m securechat)
    export PYTHONPATH="${repo_root}${PYTHONPATH:+:${PYTHONPATH}}"
fi

# Find where the files go and which client certificates are made, to verify them afterwards.
out="${SECURECHAT_CERTS_OUT:-certs}"
clients=()
help=0
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --out) out="${args[i + 1]:-}" ;;
        --out=*) out="${args[i]#--out=}" ;;
        --client) clients+=("${args[i + 1]:-}") ;;
        --client=*) clients+=("${args[i]#--client=}") ;;
        -h | --help) help=1 ;;
    esac
done

"${securechat[@]}" gen-certs "$@"
if [ "$help" = 1 ]; then
    exit 0
fi

if ! command -v openssl >/dev/null 2>&1; then
    echo "openssl not found; skipped checking the chain (run: openssl verify -CAfile ca.pem server.pem)" >&2
    exit 0
fi

cd "$out"
openssl verify -x509_strict -purpose sslserver -CAfile ca.pem server.pem
for name in "${clients[@]+"${clients[@]}"}"; do
    openssl verify -x509_strict -purpose sslclient -CAfile ca.pem "${name}.pem"
done
