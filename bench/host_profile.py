#!/usr/bin/env python3
"""Summarises a folded host profile (gpu_bench --host-profile PATH): self and inclusive samples per
function, as a share of all samples of the thread that launches the step (--root).

  python3 bench/host_profile.py PATH [--top N] [--under FUNC]...

--under FUNC: also, for each FUNC, the share of its inclusive samples by the function it calls
next (what FUNC's time is made of). Function names match by substring.
"""
import argparse
import collections


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--under", action="append", default=[])
    ap.add_argument("--root", default="gpu_bench::main", help="the thread whose stacks contain this most (the launching thread)")
    a = ap.parse_args()
    stacks = []
    per_thread = collections.Counter()
    for line in open(a.path):
        stack, n = line.rstrip("\n").rsplit(" ", 1)
        frames = stack.split(";")
        stacks.append((frames, int(n)))
        per_thread[frames[0]] += int(n)
    total = sum(per_thread.values())
    rooted = collections.Counter()
    for frames, n in stacks:
        if any(a.root in f for f in frames[1:]):
            rooted[frames[0]] += n
    main_thread = (rooted or per_thread).most_common(1)[0][0]
    print(f"{total} samples; by thread: " + ", ".join(f"{t} {n}" for t, n in per_thread.most_common(6)))
    stacks = [(f[1:], n) for f, n in stacks if f[0] == main_thread]
    busy = per_thread[main_thread]
    self_c, incl_c = collections.Counter(), collections.Counter()
    for frames, n in stacks:
        self_c[frames[-1]] += n
        for f in set(frames):
            incl_c[f] += n
    for title, c in (("self", self_c), ("inclusive", incl_c)):
        print(f"\n## {title} (thread {main_thread}, {busy} samples)\n")
        print("| % | samples | function |\n|---:|---:|---|")
        for f, n in c.most_common(a.top):
            print(f"| {100 * n / busy:.1f} | {n} | `{f[:160]}` |")
    for want in a.under:
        below = collections.Counter()
        tot = 0
        for frames, n in stacks:
            idx = [i for i, f in enumerate(frames) if want in f]
            if not idx:
                continue
            i = idx[0]  # outermost match
            tot += n
            below[frames[i + 1] if i + 1 < len(frames) else "(self)"] += n
        print(f"\n## under `{want}` ({tot} samples, {100 * tot / max(busy, 1):.1f}% of the thread)\n")
        print("| % of it | samples | calls next |\n|---:|---:|---|")
        for f, n in below.most_common(a.top):
            print(f"| {100 * n / max(tot, 1):.1f} | {n} | `{f[:160]}` |")


if __name__ == "__main__":
    main()
