"""Open-batch reference: mlx-lm's generate_step and a plain BatchGenerator with every prompt
inserted at once, on a demo preset (PRESET, default bench1b) at batch sizes BS (default
1,32,128,256). The ceiling that docs/benchmarks-gpu.md compares the closed-loop figures with.

    PRESET=bench1b BS=1,32,128,256 python3 scripts/_gpu_probe.py
"""
import time, sys, os
sys.path.insert(0, os.getcwd())
import mlx.core as mx
from mlxsup.demo import build_demo_model
t=time.time(); d=build_demo_model("/tmp/b1b", preset=os.environ.get("PRESET","bench1b")); print("build", time.time()-t, flush=True)
import mlx_lm
from mlx_lm.generate import BatchGenerator, generate_step
model, tok = mlx_lm.load(d)
from mlx.utils import tree_flatten
print("params", sum(v.size for _,v in tree_flatten(model.parameters())), flush=True)
import random
rng=random.Random(0)
prompts=[[rng.randrange(10, model.args.vocab_size - 1) for _ in range(100)] for _ in range(256)]
# single stream
gen = generate_step(mx.array(prompts[0]), model, max_tokens=128)
n=0; t=time.time()
for tokid, _ in gen:
    n+=1
    if n==1: t1=time.time()
print("generate_step tok/s", (n-1)/(time.time()-t1), flush=True)
for B in tuple(int(x) for x in os.environ.get("BS","1,32,128,256").split(",")):
    for rep in range(2):
        bg = BatchGenerator(model, max_tokens=128, stop_tokens=[], completion_batch_size=B, prefill_batch_size=min(B,32))
        uids = bg.insert(prompts[:B], max_tokens=[128]*B)
        done=0; toks=0; t=time.time(); first=None
        while done < B:
            r = bg.next()
            for x in (r[1] if isinstance(r, tuple) else r):
                toks+=1
                if getattr(x,'finish_reason',None) is not None: done+=1
        dt=time.time()-t
        print(f"B={B} rep={rep} toks={toks} tok/s={toks/dt:.1f}", flush=True)
        bg.close() if hasattr(bg,'close') else None
