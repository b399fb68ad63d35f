#!/usr/bin/env python3
"""How far two runs of the same commands print their numbers apart (two CPU classes, say).

    python3 scripts/compare_printed.py A_DIR B_DIR

A_DIR and B_DIR hold one text file per command, the same names in both: the docs examples'
outputs (`LOCKSTEP_DOCS_OUTPUT=DIR cargo test --release --test docs_examples`) or parity
summaries (`lockstep replay CASE --summary > DIR/CASE.txt`), run once on each machine or once
with `LOCKSTEP_SIMD=avx2` (docs/golden.md, "Every CPU"). Lines are paired by their text with
the numbers taken out; for each pair it measures:

- magnitudes in scientific notation (`2.7e-7`): the ratio of the larger to the smaller,
  both above 1e-9 (under it lockstep claims nothing: f32 noise);
- fixed-point numbers (`-0.26`): the difference in units of the last printed place;
- decade strips (`layers 665555`): the largest difference of one digit;
- integers that differ (a count, a token id): listed, since the rules compare them exactly.

The largest ratio is the measurement behind `CPU_MARGIN` in harness/src/golden/printed.rs.
"""
import difflib
import math
import re
import sys
from pathlib import Path

NUM = re.compile(r"(?<![\w.+-])(<?[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?%?)(?![\w]|\.\d)")
DECADE_WORDS = {"embed", "layers", "final_norm", "logits", "activations", "caches"}
FLOOR = 1e-9


def skeleton(line):
    return NUM.sub("#", " ".join(line.split()))


def numbers(line):
    line = " ".join(line.split())
    out = []
    for m in NUM.finditer(line):
        before = line[: m.start()].rstrip().rsplit(" ", 1)[-1]
        out.append((m.group(1), before in DECADE_WORDS))
    return out


def compare(a_lines, b_lines, where, found):
    sa, sb = [skeleton(x) for x in a_lines], [skeleton(x) for x in b_lines]
    sm = difflib.SequenceMatcher(a=sa, b=sb, autojunk=False)
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        if tag != "equal":
            found["unpaired"].append(f"{where}: lines {i1 + 1}-{i2} vs {j1 + 1}-{j2} differ in text")
            continue
        for i, j in zip(range(i1, i2), range(j1, j2)):
            for (x, dec), (y, _) in zip(numbers(a_lines[i]), numbers(b_lines[j])):
                if x == y:
                    continue
                at = f"{where}:{i + 1}: {x} vs {y}"
                if dec and x.isdigit() and y.isdigit() and len(x) == len(y):
                    d = max(abs(int(p) - int(q)) for p, q in zip(x, y))
                    found["decades"].append((d, at))
                elif "e" in x and "e" in y:
                    u, v = abs(float(x.lstrip("<"))), abs(float(y.lstrip("<")))
                    if max(u, v) <= FLOOR:
                        continue
                    r = math.inf if min(u, v) == 0 else max(u, v) / min(u, v)
                    found["ratios"].append((r, at))
                elif "." in x and "." in y and "e" not in x + y:
                    ulp = 10 ** -len(x.rstrip("%").split(".")[1])
                    found["fixed"].append((round(abs(float(x.rstrip("%")) - float(y.rstrip("%"))) / ulp), at))
                else:
                    found["ints"].append(at)


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: compare_printed.py A_DIR B_DIR")
    a, b = Path(sys.argv[1]), Path(sys.argv[2])
    found = {"ratios": [], "fixed": [], "decades": [], "ints": [], "unpaired": []}
    names = sorted(p.name for p in a.glob("*.txt"))
    both = [n for n in names if (b / n).is_file()]
    for n in both:
        compare((a / n).read_text().splitlines(), (b / n).read_text().splitlines(), n, found)
    print(f"{len(both)} files in both directories ({len(names) - len(both)} only in {a})")
    for key, title in [("ratios", "largest ratios of magnitudes above 1e-9"), ("fixed", "fixed-point differences (last-place units)"), ("decades", "decade digits apart")]:
        xs = sorted(found[key], reverse=True)
        print(f"{title}: {len(xs)} numbers differ" + (f", worst {xs[0][0]:.3g}" if xs else ""))
        for v, at in xs[:8]:
            print(f"  {v:.3g}  {at}")
    for key, title in [("ints", "integers that differ"), ("unpaired", "text that differs")]:
        print(f"{title}: {len(found[key])}")
        for at in found[key][:12]:
            print(f"  {at}")


if __name__ == "__main__":
    main()
