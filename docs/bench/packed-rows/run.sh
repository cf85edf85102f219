#!/bin/sh
# Packed rows on CPU, one thread per case: SeCO on a 32K row read as one stream (attention across documents)
# and as packed documents (--documents: 8 x 4K, and mixed 1K-16K), on two model shapes. docs/benchmarks.md.
# One measured step per case (no warmup: the 16-token priming step loads the code paths): on the shared
# two-core machine of this measurement a 32K cross-document step took minutes.
# Run from the repository root: sh docs/bench/packed-rows/run.sh [model:row ...]
out=docs/bench/packed-rows
mixed=1024,16384,2048,8192,1024,4096   # 1K-16K, 32,768 tokens
cases=${*:-"quick:cross quick:uniform quick:mixed quick-wide:uniform quick-wide:cross quick-wide:mixed"}
for pair in $cases; do
  model=${pair%%:*}; row=${pair#*:}
  case $row in
    cross) packed="--lengths 32768" ;;
    uniform) packed="--documents 4096x8" ;;
    mixed) packed="--documents $mixed" ;;
  esac
  echo "$model $row start: $(uptime)" >> $out/load.txt
  python -m chunkwise.cli bench --model $model --methods seco --chunk-size 1024 --threads 1 --warmup 0 --repeats 1 \
    --case-timeout 1800 $packed --output $out/$model-$row
  echo "$model $row end: $(uptime)" >> $out/load.txt
done
