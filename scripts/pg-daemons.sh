# Sourced by the perf scripts that run daemons on the throwaway PostgreSQL of
# scripts/with-postgres: credentials, a fresh database per name, and a daemon from a config file
# (own key_dir, shared passphrase). Expects $bin (the tokenvault binary), $work (a temp dir,
# removed by the caller) and the array pids (killed by the caller).

hash() { printf %s "$1" | sha256sum | cut -d' ' -f1; }
export TOKENVAULT_INGEST_TOKEN=tv_perf_ingest_0123456789abcdef0123456789
export TOKENVAULT_WORKER_TOKEN=tv_perf_worker_0123456789abcdef0123456789
export TOKENVAULT_ADMIN_TOKEN=tv_perf_admin_0123456789abcdef01234567890
printf %s "perf passphrase" >"$work/pass"
db() { # name -> URL of a fresh database
    local base=${TOKENVAULT_TEST_PG_URL%/*}
    "$TOKENVAULT_TEST_PG_BIN/psql" -q "$TOKENVAULT_TEST_PG_URL" -c "CREATE DATABASE $1" >/dev/null
    echo "$base/$1"
}
daemon() { # name port cache(true|false) [store-url]
    local dir=$work/$1; mkdir -p "$dir"
    {
        echo "listen = \"127.0.0.1:$2\""
        echo 'data_dir = "data"'
        echo 'key_dir = "keys"'
        echo "passphrase_file = \"$work/pass\""
        echo 'lock_memory = false'
        echo '[dek_cache]'
        echo "enabled = $3"
        echo 'max_entries = 100000'
        echo 'ttl_seconds = 3600'
        if [ -n "${4:-}" ]; then
            echo '[store]'
            echo "url = \"$4\""
            echo "instance = \"$1\""
            echo 'pool_size = 32'
        fi
        for role in ingest worker admin; do
            local var=TOKENVAULT_${role^^}_TOKEN
            echo '[[credentials]]'
            echo "name = \"$role\""
            echo "role = \"$role\""
            echo "sha256 = \"$(hash "${!var}")\""
        done
    } >"$dir/tokenvault.toml"
    "$bin" keys list --config "$dir/tokenvault.toml" >/dev/null 2>&1 \
        || "$bin" keys init --config "$dir/tokenvault.toml" >/dev/null
    (cd "$dir" && exec "$bin" serve --config tokenvault.toml >out 2>log) & pids+=($!)
    for _ in $(seq 100); do grep -q "^listening on" "$dir/out" 2>/dev/null && return 0; sleep 0.1; done
    echo "daemon $1 did not start: $(cat "$dir/log")" >&2; exit 1
}
