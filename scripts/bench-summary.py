"""Prints one `tokenvault-bench --json` report (the file named by the first argument) as the
perf scripts show it: each operation's rates, latency and errors, the CPU per call when the
report has it, and how many records the load generator sealed during the run (CPU taken from
the daemon on a shared machine; the write runs pass --presealed so that it is none)."""
import json
import sys

r = json.load(open(sys.argv[1]))
for o in r["operations"]:
    print(f'  {o["operation"]}: {o["ops_per_second"]:.0f} calls/s, {o["items_per_second"]:.0f} records/s, '
          f'p50 {o["p50_us"]} us, p99 {o["p99_us"]} us, errors {o["errors"]} '
          f'(of which shed with a retry time: {o.get("refused", 0)})')
cpu = r.get("cpu") or {}
if cpu.get("daemon_us_per_op") is not None:
    print(f'  CPU per call: daemon {cpu["daemon_us_per_op"]:.0f} us, load generator '
          f'{cpu["load_generator_us_per_op"]:.0f} us')
sealed = r.get("sealed") or {}
if sealed.get("during_run"):
    print(f'  records sealed during the run (load generator CPU): {sealed["during_run"]}')
