#!/bin/bash
# Continues the char-PTB paper-protocol run of ok:8 chunk by chunk (see README.md).
set -euo pipefail
cd "$(dirname "$0")"
D=${D:?the directory of ptb.char.train.txt and ptb.char.valid.txt}
KFRTRL=${KFRTRL:-kfrtrl}
for c in 2 3 4 5 6; do
  [ -s ok8_c$c.json ] && continue
  n=960000; [ $c = 6 ] && n=217504
  p=$((c - 1))
  RAYON_NUM_THREADS=${THREADS:-2} nice -n 19 "$KFRTRL" train --corpus "$D/ptb.char.train.txt" --format ptb-char \
    --eval "$D/ptb.char.valid.txt" --learner ok:8 --lr 0.001 --batch 32 --symbols $n --reset-every 100 \
    --json --init ptb_ok8_c$p.safetensors --save ptb_ok8_c$c.safetensors > ok8_c$c.json.tmp
  mv ok8_c$c.json.tmp ok8_c$c.json
done
