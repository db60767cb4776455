#!/usr/bin/env python3
"""Writes the sidecar's link order (symbol-order.txt) from callgrind profiles.

Input: callgrind files recorded with --dump-instr=yes --demangle=no (see
generate-symbol-order.sh). Output on stdout: every function of the given binary that ran, one
mangled name per line, the most instructions first. lld places them together at the start of
.text, so the code a running proxy touches shares pages, and the kernel's 64 KiB fault-around
maps far fewer pages of the binary into every sidecar (see docs/benchmarks.md).
"""
import collections
import re
import sys

NAMED = re.compile(r"^(c?(?:ob|fn))=\((\d+)\)(?: (.*))?$")


def self_costs(path, binary):
    objects, functions = {}, {}
    in_binary, function, after_calls = False, None, False
    costs = collections.Counter()
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            m = NAMED.match(line)
            if m:
                kind, ident, name = m.groups()
                table = objects if kind.endswith("ob") else functions
                if name:
                    table[ident] = name
                if kind == "ob":
                    in_binary = objects.get(ident, "").endswith("/" + binary)
                elif kind == "fn":
                    function = functions.get(ident)
                continue
            if line.startswith("calls="):
                after_calls = True  # the next cost line is the callee's, inclusive
                continue
            if line[:1] in "0123456789+-*":
                if in_binary and not after_calls and function:
                    fields = line.split()
                    if len(fields) >= 3 and fields[-1].isdigit():
                        costs[function] += int(fields[-1])
                after_calls = False
    return costs


def main():
    binary, files = sys.argv[1], sys.argv[2:]
    total = collections.Counter()
    for path in files:
        total.update(self_costs(path, binary))
    seen = set()
    for name, _ in total.most_common():
        name = re.sub(r"'\d+$", "", name)  # callgrind's recursion-level suffix
        if name.startswith("0x") or name in seen or name.startswith("("):
            continue
        seen.add(name)
        print(name)


if __name__ == "__main__":
    main()
