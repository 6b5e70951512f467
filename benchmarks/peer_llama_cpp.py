"""The peer: llama.cpp (llama-cpp-python) greedy decoding on a GGUF file, one JSON line out.

Run by the .venv-peer interpreter (`make bench-peer` builds it), never by the project's
environment: it imports nothing from edgeweave, and psutil is not there (peak RSS is the kernel's
VmHWM). Pin it from outside (`taskset -c 0 ...`); --threads sets llama.cpp's decode and batch
threads.

Generation: `Llama.generate` with temp 0 / top_k 1 (greedy) and no repeat penalty, N tokens
whatever they are (no stop on EOS, like the edgeweave side). A 2-token warm-up first, then
`reset()` (so the timed run re-evaluates the whole prompt: no prefix-cache hit), then the timed
run: TTFT = prompt evaluation + first token, per-token = median gap between consecutive tokens
of the stream (one decode + sample each).

    .venv-peer/bin/python benchmarks/peer_llama_cpp.py MODEL.gguf --threads 1 --tokens 32 \
        [--prompt-ids 1,2,3 | --prompt "text"]
    .venv-peer/bin/python benchmarks/peer_llama_cpp.py --baseline      # RSS of the bare process
    .venv-peer/bin/python benchmarks/peer_llama_cpp.py MODEL.gguf --perplexity WINDOWS.json

Output keys: ttft_s, per_token_s (median), token_s (every gap), tokens, text, peak_rss (bytes),
rss_after_load, load_s, threads, n_ctx, use_mmap. With --perplexity: per-window NLL sums and
the perplexity (exp of the mean NLL of each scored next token, as llama.cpp's perplexity tool).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

DEFAULT_CHAT = "<|im_start|>user\nTell me about the history of Paris in a few sentences.<|im_end|>\n<|im_start|>assistant\n"


def status_bytes(key: str) -> int:
    """A /proc/self/status memory line (VmHWM, VmRSS, ...) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def load(path: str, threads: int, n_ctx: int, use_mmap: bool, logits_all: bool = False):
    from llama_cpp import Llama

    start = time.perf_counter()
    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, verbose=False,
                use_mmap=use_mmap, logits_all=logits_all)
    return llm, time.perf_counter() - start


def generate(llm, prompt: list[int], n_tokens: int) -> tuple[list[int], list[float], float]:
    """Greedy tokens, the time of each token after the start, and the start."""
    tokens, stamps = [], []
    llm.reset()
    start = time.perf_counter()
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        stamps.append(time.perf_counter())
        tokens.append(int(token))
        if len(tokens) == n_tokens:
            break
    return tokens, stamps, start


def run_generation(args: argparse.Namespace) -> dict:
    llm, load_s = load(args.model, args.threads, args.n_ctx, not args.no_mmap)
    rss_after_load = status_bytes("VmRSS")
    if args.prompt_ids:
        prompt = [int(t) for t in args.prompt_ids.split(",")]
    else:
        prompt = llm.tokenize((args.prompt or DEFAULT_CHAT).encode(), add_bos=False, special=True)
    generate(llm, prompt, 2)  # warm-up
    tokens, stamps, start = generate(llm, prompt, args.tokens)
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {
        "model": args.model, "threads": args.threads, "n_ctx": args.n_ctx, "use_mmap": not args.no_mmap,
        "load_s": load_s, "prompt_tokens": len(prompt), "ttft_s": stamps[0] - start,
        "per_token_s": statistics.median(gaps) if gaps else None, "token_s": gaps, "tokens": tokens,
        "text": llm.detokenize(tokens).decode("utf-8", errors="replace"),
        "rss_after_load": rss_after_load, "peak_rss": status_bytes("VmHWM"),
    }


def run_perplexity(args: argparse.Namespace) -> dict:
    """Score fixed token windows as llama.cpp's perplexity tool does: one evaluation per window,
    logits for every position, the negative log-likelihood of each next token in the window's
    second half (positions `first`.. predicting `first`+1..; the first half is context only).

    Input JSON: {"windows": [[ids...], ...], "first": int}. Also returns every window's top-1
    predictions, so the caller can compare them with its own."""
    import numpy as np

    with open(args.perplexity) as f:
        spec = json.load(f)
    windows, first = spec["windows"], int(spec["first"])
    longest = max(len(w) for w in windows)
    llm, load_s = load(args.model, args.threads, max(args.n_ctx, longest), not args.no_mmap, logits_all=True)
    sums, counts, top1 = [], [], []
    for window in windows:
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[:len(window)], dtype=np.float64)
        top = logits.max(axis=1, keepdims=True)
        log_probs = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
        rows = np.arange(first, len(window) - 1)
        nll = -log_probs[rows, np.asarray(window)[rows + 1]]
        sums.append(float(nll.sum()))
        counts.append(int(nll.size))
        top1.append(logits.argmax(axis=1).tolist())
    total, count = sum(sums), sum(counts)
    return {"model": args.model, "threads": args.threads, "load_s": load_s, "first": first,
            "window_nll_sums": sums, "window_counts": counts, "scored_tokens": count,
            "mean_nll": total / count, "perplexity": math.exp(total / count), "top1": top1,
            "peak_rss": status_bytes("VmHWM")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--n-ctx", type=int, default=512)
    parser.add_argument("--no-mmap", action="store_true", help="read the file into memory instead of mapping it")
    parser.add_argument("--prompt-ids", help="comma-separated prompt token ids (default: a fixed chat prompt)")
    parser.add_argument("--prompt", help="prompt text, tokenized by llama.cpp with special tokens")
    parser.add_argument("--baseline", action="store_true", help="import llama_cpp, load nothing, report RSS")
    parser.add_argument("--perplexity", metavar="WINDOWS_JSON",
                        help='score {"windows": [[ids...]...], "first": k} (see run_perplexity)')
    args = parser.parse_args()
    if args.baseline:
        import llama_cpp

        out = {"llama_cpp": llama_cpp.__version__, "peak_rss": status_bytes("VmHWM"), "rss": status_bytes("VmRSS")}
    elif args.model is None:
        parser.error("a GGUF file is needed")
    elif args.perplexity:
        out = run_perplexity(args)
    else:
        out = run_generation(args)
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
