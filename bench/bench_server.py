"""`kimi-mlx serve` under load: N concurrent clients (the official openai package, threads).

Starts `cli.py serve` in a subprocess (so the clients do not share its interpreter) and reports
  1. decode: each of N clients streams completions of --decode-tokens tokens (ignore_eos);
     total generated tokens/s over the run, request latency p50/p95, TTFT p50. N = 1 and --clients.
     Target: N = 8 gives >= 4x the total tokens/s of N = 1.
  2. multi-turn: one conversation of --turns turns; TTFT of each turn (the state cache makes a
     follow-up prefill only its new tokens).
  3. long history: a first turn of ~--history tokens, then a follow-up turn: its TTFT against a
     cold prefill of a history of the same length (a conversation the server has not seen).
     Target: follow-up TTFT <= 10% of the cold one.
Prints a table and writes bench/results/bench_server.json. Timings only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "serve", "--model", model, "--port", str(port),
                             *extra], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600)
    for _ in range(600):
        try:
            client.models.list()
            return proc
        except openai.APIConnectionError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not start")


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def stream_completion(client, prompt, max_tokens):
    """-> (ttft s, total s, generated tokens)"""
    t0 = time.perf_counter()
    ttft, n = None, 0
    for ch in client.completions.create(model="m", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                                        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
        if ttft is None and ch.choices:
            ttft = time.perf_counter() - t0
        if ch.usage is not None:
            n = ch.usage.completion_tokens
    return ttft, time.perf_counter() - t0, n


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def decode_run(client, clients: int, requests_each: int, tokens: int, pid: int) -> dict:
    results, lock = [], threading.Lock()
    cpu0 = cpu_seconds(pid)

    def worker(i):
        for j in range(requests_each):
            r = stream_completion(client, f"copy {i} {j} a b c d", tokens)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(pid) - cpu0
    total = sum(r[2] for r in results)
    lat = [r[1] for r in results]
    return {"clients": clients, "requests": len(results), "tokens": total, "wall_s": wall, "tok_s": total / wall,
            "latency_p50_s": pct(lat, 0.5), "latency_p95_s": pct(lat, 0.95),
            "ttft_p50_s": pct([r[0] for r in results], 0.5),
            "server_cpu_ms_per_token": 1e3 * cpu / max(total, 1)}


def chat_ttft(client, messages, max_tokens=8) -> tuple[float, str, dict]:
    t0 = time.perf_counter()
    ttft, text, usage = None, "", None
    for ch in client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True}):
        if ch.choices and ch.choices[0].delta.content and ttft is None:
            ttft = time.perf_counter() - t0
        if ch.choices:
            text += ch.choices[0].delta.content or ""
        if ch.usage is not None:
            usage = ch.usage.model_dump()
    return ttft if ttft is not None else time.perf_counter() - t0, text, usage


def multi_turn(client, turns: int, words: int) -> list[dict]:
    messages, out = [{"role": "system", "content": "answer briefly"}], []
    for t in range(turns):
        messages.append({"role": "user", "content": " ".join(f"copy w{t}x{i}" for i in range(words))})
        ttft, text, usage = chat_ttft(client, messages)
        out.append({"turn": t + 1, "ttft_s": ttft, "prompt_tokens": usage["prompt_tokens"],
                    "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]})
        messages.append({"role": "assistant", "content": text})
    # the last turn again in a conversation the server has not seen (another system prompt): cold
    cold = [{"role": "system", "content": "answer shortly"}] + messages[1:-1]
    ttft, _, usage = chat_ttft(client, cold)
    out.append({"turn": f"{turns} cold", "ttft_s": ttft, "prompt_tokens": usage["prompt_tokens"],
                "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]})
    return out


def long_history(client, tokenizer, history_tokens: int) -> dict:
    words, filler = [], ""
    while len(tokenizer.encode(filler)) < history_tokens:  # grow to the size, counted by the model's tokenizer
        step = max(8, (history_tokens - len(tokenizer.encode(filler))) // 8)  # ~8 tokens a word at most
        words += [f"item{len(words) + i}" for i in range(step)]
        filler = " ".join(words)

    def conversation(tag):
        return [{"role": "user", "content": f"{tag} {filler}"}]

    first = conversation("remember")
    ttft1, reply, u1 = chat_ttft(client, first)
    follow = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "copy a b"}]
    ttft_follow, _, u2 = chat_ttft(client, follow)
    cold = conversation("recall") + [{"role": "assistant", "content": reply}, {"role": "user", "content": "copy a b"}]
    ttft_cold, _, u3 = chat_ttft(client, cold)
    return {"history_tokens": u1["prompt_tokens"], "first_ttft_s": ttft1, "follow_up_ttft_s": ttft_follow,
            "follow_up_cached": u2["prompt_tokens_details"]["cached_tokens"], "follow_up_prompt": u2["prompt_tokens"],
            "cold_ttft_s": ttft_cold, "cold_cached": u3["prompt_tokens_details"]["cached_tokens"],
            "ratio": ttft_follow / ttft_cold}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=3, help="requests per client")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--turn-words", type=int, default=40)
    ap.add_argument("--history", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3, help="1-client / N-client run pairs")
    a = ap.parse_args()

    port = free_port()
    proc = start_server(a.model, port, ["--max-batch", str(max(16, a.clients))])
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600)
    try:
        decode_run(client, 1, 1, 8, proc.pid)  # warm-up
        # 1 and N clients in turn, --repeats times: the machine's load drifts, so each ratio compares
        # neighbouring runs and the medians are reported
        pairs = [[decode_run(client, n, a.requests, a.decode_tokens, proc.pid) for n in (1, a.clients)]
                 for _ in range(a.repeats)]
        turns = multi_turn(client, a.turns, a.turn_words)
        from kimi_mlx import load_tokenizer
        from kimi_mlx.loading import resolve_model_path

        hist = long_history(client, load_tokenizer(resolve_model_path(a.model)), a.history)
    finally:
        proc.terminate()
        proc.wait(60)

    print(f"decode ({a.decode_tokens} tokens a request, {a.requests} requests a client)")
    print(f"{'clients':>7s} {'tok/s':>8s} {'p50 s':>7s} {'p95 s':>7s} {'TTFT p50':>9s} {'server CPU ms/tok':>18s}")
    runs = [r for pair in pairs for r in pair]
    for r in runs:
        print(f"{r['clients']:7d} {r['tok_s']:8.1f} {r['latency_p50_s']:7.2f} {r['latency_p95_s']:7.2f} "
              f"{r['ttft_p50_s']:9.3f} {r['server_cpu_ms_per_token']:18.2f}")
    ratios = [n["tok_s"] / one["tok_s"] for one, n in pairs]
    speedup = statistics.median(ratios)
    print(f"{a.clients} clients / 1 client total tok/s: median {speedup:.2f}x of "
          f"{', '.join(f'{r:.2f}' for r in ratios)} (target >= 4x)")
    cpu_ratios = [one["server_cpu_ms_per_token"] / n["server_cpu_ms_per_token"] for one, n in pairs]
    print(f"server CPU per token, 1 client / {a.clients} clients: median {statistics.median(cpu_ratios):.2f}x "
          "(less sensitive to other jobs on the machine than wall time)")
    print("multi-turn TTFT")
    for t in turns:
        print(f"  turn {t['turn']!s:>6s}: {1e3 * t['ttft_s']:7.1f} ms  prompt {t['prompt_tokens']:5d}  "
              f"cached {t['cached_tokens']:5d}")
    print(f"long history: {hist['history_tokens']} tokens; follow-up TTFT {1e3 * hist['follow_up_ttft_s']:.1f} ms "
          f"({hist['follow_up_cached']} of {hist['follow_up_prompt']} cached) vs cold {1e3 * hist['cold_ttft_s']:.1f} ms"
          f" -> {100 * hist['ratio']:.1f}% (target <= 10%)")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "bench_server.json").write_text(json.dumps(
        {"args": vars(a), "decode": runs, "ratios": ratios, "speedup": speedup, "cpu_ratios": cpu_ratios, "turns": turns, "long_history": hist}, indent=2))


if __name__ == "__main__":
    main()
