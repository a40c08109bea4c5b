"""python -m bench.budget FILE...: the CPU budget of one message at half the relay's rate.

Reads `saturate --target floors` (or `all`) results written with `--json` and prints, for each run,
the machine's CPU per delivered message of every target, split into the server, the load generator,
PostgreSQL and the rest (Redis, the samplers, the kernel's share the process tree does not show), and
the budget: at half the relay's rate, the 2 cores have 2000 ms / (rate / 2) of CPU for each message,
load generator included, as the issue counts it. The split says where a target's CPU goes. With
webchat and `relay-sql` in the same run it also prints a floor for webchat: the CPU per message of a
server that did nothing but webchat's database work (relay-sql's server and PostgreSQL), plus what
webchat's own load generator and the rest of the machine spend per message (its frames are HTML
fragments and its requests carry a session), and the rate that floor allows; and the converse, webchat
with a free database: its server's CPU less what the database work costs a relay (relay-sql's server
over the relay's), no PostgreSQL, and the same load generator and rest; and the server CPU per message
webchat could spend at half the relay's rate, against what relay-sql's server spends.
"""
from __future__ import annotations

import json
import sys

PARTS = ("server", "loadgen", "postgres")


def per_message(result: dict) -> dict[str, float]:
    """Return ms of CPU per delivered message, by part, from one target's result."""
    rate = result["delivered_rate"]
    out = {part: result[part]["cpu_mean"] * 10 / rate for part in PARTS}  # % of a core -> ms per s
    out["machine"] = result["system"]["cpu_mean"] * 10 / rate
    out["other"] = out["machine"] - sum(out[part] for part in PARTS)
    return out


def report(path: str) -> str:
    with open(path) as f:
        data = json.load(f)
    results = data["results"]
    relay = results["relay"]["delivered_rate"]
    cores = data.get("cpus", 2)
    budget = cores * 1000 / (relay / 2)
    lines = [f"{path} (app {data.get('app', '?')}, {data.get('at', '?')})",
             f"  relay {relay:.1f} msg/s; at half of it ({relay / 2:.1f} msg/s) {cores} cores give "
             f"{budget:.1f} ms of CPU per message",
             "  target       rate    ratio  machine  server  loadgen  postgres  other  (ms of CPU per message)"]
    for name in ("webchat", "relay-sql", "relay-db", "relay"):
        if name not in results:
            continue
        r = results[name]
        cost = per_message(r)
        verdict = "over the budget" if cost["machine"] > budget else "within the budget"
        lines.append(f"  {name:<10} {r['delivered_rate']:6.1f}  {r['delivered_rate'] / relay:5.0%}  "
                     f"{cost['machine']:7.1f}  {cost['server']:6.1f}  {cost['loadgen']:7.1f}  "
                     f"{cost['postgres']:8.1f}  {cost['other']:5.1f}  {verdict}")
    if "webchat" in results and "relay-sql" in results:
        # Webchat's load generator and rest (its frames are HTML, its requests carry a session), with
        # a server that did nothing but webchat's database work: relay-sql's server and PostgreSQL.
        own, sql = per_message(results["webchat"]), per_message(results["relay-sql"])
        floor = sql["server"] + sql["postgres"] + own["loadgen"] + own["other"]
        best = cores * 1000 / floor
        database, client = sql["server"] + sql["postgres"], own["loadgen"] + own["other"]
        lines.append(f"  floor for webchat: relay-sql's server and PostgreSQL ({database:.1f}) + webchat's load "
                     f"generator and rest ({client:.1f}) = {floor:.1f} ms per message: at most {best:.0f} msg/s, "
                     f"{best / relay:.0%} of the relay")
        # What webchat's server could spend at half the relay's rate, after its own load generator,
        # rest and PostgreSQL (or relay-sql's PostgreSQL, the same transaction with less contention),
        # against what relay-sql's server spends on the database work alone.
        left = budget - own["loadgen"] - own["other"]
        lines.append(f"  webchat's server budget at half the relay's rate: {left - own['postgres']:.1f} ms "
                     f"({left - sql['postgres']:.1f} with relay-sql's PostgreSQL cost); relay-sql's server "
                     f"spends {sql['server']:.1f} ms on the database work alone, webchat's {own['server']:.1f}")
        # And the other way round: webchat's server without what its database work costs the relay
        # (relay-sql's server CPU over the relay's), with no PostgreSQL at all.
        bare = own["server"] - (sql["server"] - per_message(results["relay"])["server"])
        floor = bare + client
        best = cores * 1000 / floor
        lines.append(f"  webchat with a free database: its server less the database work ({bare:.1f}) + its load "
                     f"generator and rest ({client:.1f}) = {floor:.1f} ms per message: at most {best:.0f} msg/s, "
                     f"{best / relay:.0%} of the relay")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit(__doc__)
    print("\n\n".join(report(path) for path in argv))


if __name__ == "__main__":
    main(sys.argv[1:])
