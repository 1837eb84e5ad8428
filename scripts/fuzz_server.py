"""Long fuzz run against a body server: `python scripts/fuzz_server.py [--examples 20000] [--seed 0]`.

Starts `lambdasplit serve` on a tiny random Llama (built offline, as the tests do), sends hostile frames
drawn from tests/fuzzing.py's strategy over one connection (a new one after a fatal refusal), and reports
inputs tried, answers by error code, findings (no answer, a malformed answer, an undocumented code, the
server gone) and the server's memory before and after. A canary session must still be exact at the end.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from hypothesis import HealthCheck, given, settings  # noqa: E402
from websockets.sync.client import ClientConnection, connect  # noqa: E402

from fuzzing import KNOWN_CODES, frames, unanswered  # noqa: E402
from lambdasplit.client import connect_device  # noqa: E402
from lambdasplit.generation import generate  # noqa: E402
from lambdasplit.server.process import body_server_process  # noqa: E402
from lambdasplit.split import load_split  # noqa: E402
from lambdasplit.wire import Frame, MessageType, decode_frame, encode_frame  # noqa: E402
from tiny_models import NUM_LAYERS, build_tiny, make_tokenizer  # noqa: E402


def rss_kib(port: int) -> int:
    import subprocess

    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True).stdout
    pid = out.split("pid=")[1].split(",")[0]
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    random.seed(args.seed)
    folder = Path(tempfile.mkdtemp(prefix="lambdasplit-fuzz-"))
    build_tiny("llama").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    layers = f"1:{NUM_LAYERS - 1}"
    codes: Counter[str] = Counter()
    findings: list[str] = []
    state: dict = {"ws": None, "tried": 0, "connections": 0}
    with body_server_process(["--model", str(folder), "--layers", layers, "--max-frame-bytes", "65536"]) as url:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        split, canary = connect_device(url, folder, quiet=True)
        link = canary.open_session("float32")
        rss_before = rss_kib(port)

        def fresh() -> ClientConnection:
            ws = connect(url, compression=None, proxy=None, max_size=None).__enter__()
            ws.send(encode_frame(Frame.json(MessageType.HELLO, {})))
            decode_frame(ws.recv(timeout=10))
            ws.send(encode_frame(Frame.json(MessageType.OPEN, {})))
            decode_frame(ws.recv(timeout=10))
            state["connections"] += 1
            return ws

        start = time.monotonic()

        @settings(max_examples=args.examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(frames)
        def one(data: bytes) -> None:
            if state["ws"] is None:
                state["ws"] = fresh()
            state["tried"] += 1
            try:
                state["ws"].send(data)
                if unanswered(data):  # a TREE frame: the connection must still answer a PING
                    state["ws"].send(encode_frame(Frame(MessageType.PING)))
                reply = decode_frame(state["ws"].recv(timeout=30))
            except Exception as exc:  # no answer, or not a frame: a finding
                findings.append(f"{data[:40].hex()}: {exc!r}")
                state["ws"] = None
                return
            if reply.type is MessageType.ERROR:
                code = reply.json_body().get("code", "?")
                codes[code] += 1
                if code not in KNOWN_CODES:
                    findings.append(f"{data[:40].hex()}: undocumented code {code}")
                if code in ("bad_protocol", "model_mismatch"):
                    state["ws"] = None
            else:
                codes[f"ok:{reply.type.name}"] += 1
            if state["tried"] % 2000 == 0:
                print(
                    f"  {state['tried']} inputs, {time.monotonic() - start:.0f} s, {len(findings)} findings", flush=True
                )

        one()
        seconds = time.monotonic() - start
        rss_after = rss_kib(port)
        got = generate(split, [1, 5, 9, 200], max_new_tokens=8, ignore_eos=True, link=link).token_ids
        want = generate(load_split(folder, layers), [1, 5, 9, 200], max_new_tokens=8, ignore_eos=True).token_ids
        canary.close()
    print(f"inputs tried: {state['tried']} in {seconds:.0f} s over {state['connections']} connections")
    print(f"findings (no answer, malformed answer, undocumented code): {len(findings)}")
    for f in findings[:20]:
        print("  ", f)
    print(f"server RSS: {rss_before / 1024:.1f} MiB before, {rss_after / 1024:.1f} MiB after")
    print(f"canary session exact afterwards: {got == want}")
    print("answers:", ", ".join(f"{k} {v}" for k, v in codes.most_common()))
    sys.exit(1 if findings or got != want else 0)


if __name__ == "__main__":
    main()
