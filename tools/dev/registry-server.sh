#!/usr/bin/env bash
# Starts two OCI registries (Debian's docker-registry) on 127.0.0.1 for the
# OCI import tests, one open and one with htpasswd basic auth, and prints the
# environment that points the tests at them:
#   eval "$(tools/dev/registry-server.sh start)"     tools/dev/registry-server.sh stop
# Plain HTTP: cairn talks to them with --insecure.
set -euo pipefail
dir=${CAIRN_REGISTRY_DIR:-/tmp/cairn-registry}
port=${CAIRN_REGISTRY_PORT:-5015}
auth_port=${CAIRN_REGISTRY_AUTH_PORT:-5016}
user=cairn
password=cairn-registry-secret

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_one() { # NAME PORT [AUTH]
    local d="$dir/$1"
    mkdir -p "$d/data"
    {
        echo "version: 0.1"
        echo "log: {level: warn}"
        echo "storage: {filesystem: {rootdirectory: $d/data}, delete: {enabled: true}}"
        echo "http: {addr: 127.0.0.1:$2, secret: cairn-test-only}"
        if [ -n "${3:-}" ]; then
            htpasswd -Bbn "$user" "$password" >"$d/htpasswd"
            echo "auth: {htpasswd: {realm: cairn-test, path: $d/htpasswd}}"
        fi
    } >"$d/config.yml"
    nohup docker-registry serve "$d/config.yml" >"$d/log" 2>&1 &
    echo $! >"$d/pid"
    for _ in $(seq 100); do up "$2" && return 0; sleep 0.1; done
    echo "docker-registry did not start on port $2; see $d/log" >&2
    exit 1
}

case "${1:-start}" in
start)
    up "$port" || start_one open "$port"
    up "$auth_port" || start_one auth "$auth_port" htpasswd
    echo "export CAIRN_TEST_REGISTRY=127.0.0.1:$port CAIRN_TEST_REGISTRY_AUTH=127.0.0.1:$auth_port"
    echo "export CAIRN_TEST_REGISTRY_USER=$user CAIRN_TEST_REGISTRY_PASSWORD=$password"
    ;;
stop)
    for n in open auth; do
        [ -f "$dir/$n/pid" ] && kill "$(cat "$dir/$n/pid")" 2>/dev/null || true
        rm -f "$dir/$n/pid"
    done
    ;;
esac
