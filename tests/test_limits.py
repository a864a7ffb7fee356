"""The pieces behind the server's limits, without sockets: the token bucket, the connection
caps, and the command line that sets them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from securechat import framing, protocol
from securechat.client.session import ClientSession
from securechat.errors import ErrorCode, ProtocolError
from securechat.ratelimit import RATE_LIMITED, TokenBucket
from securechat.server.admission import Admission, Refusal

from .conftest import REPO


def test_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket.full(rate=2.0, burst=3, now=100.0, max_refusals=3)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(100.4) is False  # 0.8 of a token so far
    assert bucket.take(100.5) is True  # one token after half a second at 2/s
    assert bucket.take(200.0) and bucket.tokens == 2.0  # saved up to the burst, no more


def test_bucket_calls_it_a_flood_only_after_refusals_in_a_row() -> None:
    bucket = TokenBucket.full(rate=1.0, burst=1, now=0.0, max_refusals=3)
    assert bucket.take(0.0)
    assert not bucket.take(0.0) and not bucket.take(0.0)
    assert not bucket.flooding
    assert bucket.take(1.0)  # a request that gets through forgives the refusals
    assert bucket.refusals == 0
    for _ in range(3):
        bucket.take(1.0)
    assert bucket.flooding


def test_bucket_ignores_a_clock_that_goes_back() -> None:
    bucket = TokenBucket.full(rate=1.0, burst=1, now=10.0, max_refusals=1)
    assert bucket.take(10.0)
    assert not bucket.take(5.0)
    assert bucket.tokens == 0.0


def test_bucket_in_order_refuses_all_after_a_refusal_until_resume() -> None:
    bucket = TokenBucket.full(rate=1.0, burst=1, now=0.0, max_refusals=5)
    assert bucket.take_in_order(0.0, resume=False)
    assert not bucket.take_in_order(0.5, resume=False)
    assert bucket.retry_after(0.5) == 0.5
    # A token is back, but the sender has not said it saw the refusal: held, and counted.
    assert not bucket.take_in_order(2.0, resume=False)
    assert (bucket.refusals, bucket.tokens) == (2, 0.5)  # held refusals spend nothing
    assert bucket.retry_after(2.0) == 0.0
    assert bucket.take_in_order(2.0, resume=True)
    assert bucket.refusals == 0
    assert not bucket.take_in_order(2.0, resume=False)  # no token: a refusal of its own


def test_admission_caps_total_and_per_address() -> None:
    caps = Admission(max_total=3, max_per_address=2, max_refusing=1)
    assert caps.admit("10.0.0.1") is None
    assert caps.admit("10.0.0.1") is None
    assert caps.admit("10.0.0.1") == Refusal(
        ErrorCode.TOO_MANY_CONNECTIONS, "too many connections from your address (at most 2)"
    )
    assert caps.admit("10.0.0.2") is None
    assert caps.admit("10.0.0.3") == Refusal(
        ErrorCode.SERVER_FULL, "the server is full (3 connections); try again later"
    )
    assert (caps.total, caps.count("10.0.0.1")) == (3, 2)
    caps.release("10.0.0.1")
    assert caps.admit("10.0.0.3") is None
    assert caps.start_refusal() is True
    assert caps.start_refusal() is False  # one refusal at a time may be explained
    caps.end_refusal()
    assert caps.start_refusal() is True
    assert caps.open == 4  # three admitted, one being told why


def test_zero_means_no_cap() -> None:
    caps = Admission(max_total=0, max_per_address=0)
    assert all(caps.admit("10.0.0.1") is None for _ in range(1000))


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--rate", "0"], "'--rate' (env var: 'SECURECHAT_RATE'): 0.0 is not in the range x>=0.1."),
        (["--max-frame", "100"], "'--max-frame' (env var: 'SECURECHAT_MAX_FRAME'): 100 is not in "
         "the range 1024<=x<=16777216."),
        (["--idle-timeout", "-1"], "'--idle-timeout' (env var: 'SECURECHAT_IDLE_TIMEOUT'): -1.0 is "
         "not in the range x>=0."),
    ],
)  # fmt: skip
def test_bad_limit_values_are_refused_by_name(args: list[str], error: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "securechat", "server", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == f"Error: Invalid value for {error}"


@pytest.mark.parametrize(
    ("announced", "adopted"),
    [
        (framing.MIN_FRAME, framing.MIN_FRAME),
        (framing.MIN_FRAME - 1, framing.MAX_FRAME_DEFAULT),  # no server of ours can say that
        (framing.MAX_FRAME_CEILING + 1, framing.MAX_FRAME_CEILING),  # nor that
        (True, framing.MAX_FRAME_DEFAULT),
        ("4096", framing.MAX_FRAME_DEFAULT),
    ],
)
def test_the_client_adopts_any_frame_limit_a_server_may_set_and_no_other(
    announced: object, adopted: int
) -> None:
    session = ClientSession()
    session.adopt_limits({"type": "welcome", "max_frame": announced})
    assert session.max_frame == adopted
    with pytest.raises(ProtocolError) as info:
        session.receive_data(framing.HEADER.pack(adopted + 1))
    limit = f"the limit is {adopted}"
    assert info.value.message == f"frame header announces {adopted + 1} bytes; {limit}"


@pytest.mark.server_config(max_frame=framing.MIN_FRAME)
def test_a_server_with_the_smallest_frame_limit_is_heeded_by_its_client(server, connect) -> None:
    alice = connect("alice")
    with pytest.raises(ProtocolError) as info:
        alice.send("#lobby", "x" * framing.MIN_FRAME)
    assert info.value.message.endswith(f" bytes exceeds the {framing.MIN_FRAME}-byte limit")
    assert alice.send("#lobby", "fits").result(5)["type"] == "ok"


def test_every_request_after_login_is_rate_limited_but_acks_and_those_the_session_answers() -> None:
    # The server spends a user's tokens on RATE_LIMITED requests and the client paces the same
    # set; a new request type must be placed on one side or the other here.
    answered_by_the_session = {"hello", "auth", "ping", "pong", "bye"}
    own_bucket = {"ack", "publish_device", "prekey_count", "publish_prekeys"}
    assert set(protocol.CLIENT_FRAMES) - answered_by_the_session - own_bucket == RATE_LIMITED
