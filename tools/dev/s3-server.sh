#!/usr/bin/env bash
# Starts s3s-fs on 127.0.0.1 with SigV4 credentials and prints the
# environment that points cairn and its tests at it:
#   eval "$(tools/dev/s3-server.sh start)"     tools/dev/s3-server.sh stop
set -euo pipefail
dir=${CAIRN_S3_DIR:-/tmp/cairn-s3}
port=${CAIRN_S3_PORT:-9014}
case "${1:-start}" in
start)
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        mkdir -p "$dir/data"
        nohup s3s-fs --host 127.0.0.1 --port "$port" --access-key cairntest \
            --secret-key cairntestsecret "$dir/data" >"$dir/log" 2>&1 &
        echo $! >"$dir/pid"
        for _ in $(seq 100); do
            (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
            sleep 0.1
        done
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "s3s-fs did not start; see $dir/log" >&2; exit 1; }
    fi
    echo "export CAIRN_TEST_S3_ENDPOINT=http://127.0.0.1:$port AWS_ENDPOINT_URL=http://127.0.0.1:$port"
    echo "export AWS_ACCESS_KEY_ID=cairntest AWS_SECRET_ACCESS_KEY=cairntestsecret AWS_REGION=us-east-1"
    ;;
stop)
    [ -f "$dir/pid" ] && kill "$(cat "$dir/pid")" 2>/dev/null || true
    rm -f "$dir/pid"
    ;;
esac
