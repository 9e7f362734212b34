#!/usr/bin/env bash
# Turns delayed ACKs off on the loopback route. s3s-fs does not set
# TCP_NODELAY: a streamed body written after its headers waits for the
# client's delayed ACK (40 ms on Linux), which would swamp both cairn and
# any baseline. Real S3 endpoints do not behave so; this removes the
# artefact so the benchmarks measure the server, not a timer.
set -uo pipefail
sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
$sudo ip route change local 127.0.0.1 dev lo proto kernel scope host src 127.0.0.1 \
    table local quickack 1 ||
    echo "warning: could not set quickack on lo; S3 latencies include 40 ms delayed-ACK stalls" >&2
