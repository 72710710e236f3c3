#!/usr/bin/env bash
# The main job on the embedded default: a collector (SQLite) and an agent replaying real
# captures, then the anomalous verdicts through aurisctl. Run it with `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
# The logs go to files here and the demo quotes them: human lines, not the JSON a file gets by default.
export AURIS_AGENT_LOG_FORMAT=text AURIS_COLLECTOR_LOG_FORMAT=text
demo=.demo
pcaps=tests/data/pcaps
rm -rf "$demo" && mkdir -p "$demo"
# Two alert rules and a JSON-lines sink (every option: packaging/collector.toml).
cat >"$demo/collector.toml" <<EOF
models_dir = "models"
[[alert_rules]]
name = "attack-source"
anomalous = true
group_by = ["src_ip"]
severity = "critical"
[[alert_rules]]
name = "port-sweep"
anomalous = true
group_by = ["src_ip"]
count = 50
window_minutes = 5.0
[[alert_sinks]]
name = "log"
kind = "jsonl"
path = "$demo/alerts.jsonl"
EOF

"$bin/auris-collector" --config "$demo/collector.toml" serve --insecure --listen 127.0.0.1:0 \
    --db "$demo/auris.db" --address-file "$demo/collector.addr" --log-level warning 2>"$demo/collector.log" &
collector=$!
trap 'kill "$collector" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do [ -s "$demo/collector.addr" ] && break; sleep 0.1; done
[ -s "$demo/collector.addr" ] || { echo "demo: the collector did not start:" >&2; cat "$demo/collector.log" >&2; exit 1; }
address=$(cat "$demo/collector.addr")
echo "== collector listening on $address (database $demo/auris.db)"

echo "== agent: replaying benign and attack captures from $pcaps"
"$bin/auris-agent" --insecure --collector "$address" --models-dir models --state-dir "$demo/agent" \
    --pcap "$pcaps/steam.pcap" --pcap "$pcaps/kerberos.pcap" --pcap "$pcaps/KakaoTalk_chat.pcap" \
    --pcap "$pcaps/masscan_tcp_0_1000_20190821.pcap" --pcap "$pcaps/trickbot.pcap" \
    --pcap "$pcaps/WebattackSQLinj.pcap" --pcap "$pcaps/nmap_nmap_80_w_service_detection.pcap" \
    2>"$demo/agent.log" || { echo "demo: the agent failed:" >&2; tail -5 "$demo/agent.log" >&2; exit 1; }
grep -o "metered.*" "$demo/agent.log"

total=$("$bin/aurisctl" --insecure --collector "$address" verdicts --since 1h --limit 0 --json | wc -l)
flagged=$("$bin/aurisctl" --insecure --collector "$address" verdicts --since 1h --anomalous --limit 0 --json | wc -l)
echo "== $total verdicts stored, $flagged anomalous; the newest 25 anomalous:"
"$bin/aurisctl" --insecure --collector "$address" verdicts --since 1h --anomalous --limit 25
echo "== open alerts (one per rule and source; notifications in $demo/alerts.jsonl):"
"$bin/aurisctl" --insecure --collector "$address" alerts list --state open
echo "== models in the collector's registry:"
"$bin/aurisctl" --insecure --collector "$address" models list

kill -TERM "$collector"
wait "$collector"
trap - EXIT
echo "== collector stopped cleanly"
