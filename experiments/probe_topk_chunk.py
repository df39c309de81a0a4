"""Probe: the top-k kernel on one causal [2048, 128k] chunk of random scores (GPU): sampled vs
whole-row search, exactness against lax.top_k, and how many rows the sample sent to the whole-row
search. Session 14 ran it as topk_check_s14.py (experiments/results/bench_dsa_h200/topk_check_s14.log).

  python -m experiments.probe_topk_chunk
"""
import time,jax,jax.numpy as jnp,numpy as np
from pallas_kernels import dsa_topk as T
S,R,k=131072,2048,2048
print(jax.devices()[0].device_kind, flush=True)
x=jax.random.normal(jax.random.key(0),(R,S)); n=jnp.arange(S-R,S,dtype=jnp.int32)+1
for dt in (jnp.bfloat16,jnp.float32):
  xs=x.astype(dt)
  ref=np.sort(np.asarray(jax.lax.top_k(jnp.where(jnp.arange(S)<n[:,None],xs.astype(jnp.float32),-jnp.inf),k)[1]),-1)
  vs = (("sample",T.TopKBlocks()),("radix",T.TopKBlocks(sample=False)),("every32",T.TopKBlocks(sample_every=32))) if dt == jnp.bfloat16 else (("sample",T.TopKBlocks()),("radix",T.TopKBlocks(sample=False)))
  for name,b in vs:
    f=jax.jit(lambda s,n,b=b:T.top_k(s,k,lengths=n,split=1,blocks=b)); o=f(xs,n).block_until_ready(); ts=[]
    for _ in range(9): t=time.perf_counter(); f(xs,n).block_until_ready(); ts.append(time.perf_counter()-t)
    print(dt.__name__,name,(np.sort(np.asarray(o),-1)==ref).all(),'%.3f ms'%(1e3*np.median(ts)), flush=True)
  c=T.collect_candidates(xs,n,k=k); print('failed',int(((c[2]>=0)&(c[3]!=0)).sum()),'mean',float(c[2].mean()), flush=True)
