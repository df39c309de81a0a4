"""NSA Pallas kernels (pallas_kernels/nsa.py) against lca.attention.nsa's reference.

CPU runs them in interpret mode (the real kernel code), so sizes are small."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lca.attention import nsa
from pallas_kernels import hopper_unavailable
from pallas_kernels import nsa as kernels
from pallas_kernels import nsa_cmp_cudnn

SIZES = nsa.NSASizes(block_len=8, block_stride=4, select_block=16, num_selected=4, window=16)


def _inputs(key, length, heads, kv_heads, dim=16, dtype=jnp.float32, sizes=SIZES, v_dim=None, batch=1):
  """q, k, v, kc, vc; v and vc of v_dim (default: dim)."""
  v_dim = v_dim or dim
  ks = jax.random.split(key, 5)
  q = jax.random.normal(ks[0], (batch, length, heads, dim), dtype)
  k = jax.random.normal(ks[1], (batch, length, kv_heads, dim), dtype)
  v = jax.random.normal(ks[2], (batch, length, kv_heads, v_dim), dtype)
  nc = sizes.num_compressed(length)
  kc = jax.random.normal(ks[3], (batch, nc, kv_heads, dim), dtype)
  vc = jax.random.normal(ks[4], (batch, nc, kv_heads, v_dim), dtype)
  return q, k, v, kc, vc


def _reference_branches(q, k, v, kc, vc, sizes=SIZES):
  ns = sizes.num_select_blocks(k.shape[1])
  o_cmp = nsa.compressed_attention_reference(q, kc, vc, sizes=sizes)
  imp = nsa.block_importance_reference(q, kc, sizes=sizes, num_select=ns)
  idx = nsa.select_blocks(imp, sizes=sizes)
  return o_cmp, nsa.selected_attention_reference(q, k, v, idx, select_block=sizes.select_block), idx


# small tiles: unmasked compressed steps (block_kc <= Nc), dK/dV split 3 ways, unrolled selection, the
# compressed backward's kernels on tiles of their own (dQ: 32 rows, 16 keys a step; dK/dV: chunks of 4),
# and the selected dQ from the dS that the selected dK/dV kernel stores
SMALL_TILES = kernels.Tuning(block_kc=8, cmp_rows=16, cmp_dkdv_rows=32, cmp_dkdv_splits=3, sel_unroll=True,
                             cmp_dq_rows=32, cmp_dq_bk=16, cmp_dkdv_bk=4, sel_dq_from_ds=True)


# the small-tiles case also runs head dims that are not powers of two (q·k 24 zero-padded to 32 inside,
# v 16), as DeepSeek's 192 / 128
@pytest.mark.parametrize("tuning,dim,v_dim", [(kernels.Tuning(), 16, 16), (SMALL_TILES, 24, 16)],
                         ids=["default", "small_tiles_qk24_v16"])
def test_cmp_and_slc_kernels_match_reference_forward_and_grads(tuning, dim, v_dim):
  """Compressed attention, importance, top-n and selected attention, GQA group of 3 (padded to 4)."""
  args = _inputs(jax.random.key(0), 75, 6, 2, dim=dim, v_dim=v_dim)
  w1, w2 = jax.random.normal(jax.random.key(1), (2, 1, 75, 6, v_dim))

  def outputs_and_grads(branches):
    """One compile for the forward (outputs as aux) and the gradients of a weighted sum."""
    def loss(*a):
      o_cmp, o_slc, idx = branches(*a)
      return jnp.sum(o_cmp * w1) + jnp.sum(o_slc * w2), (o_cmp, o_slc, idx)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(*args)

  g, (o_cmp, o_slc, idx) = outputs_and_grads(
      lambda *a: kernels.nsa_cmp_slc(*a, sizes=SIZES, tuning=tuning, return_selection=True))
  g_ref, (r_cmp, r_slc, r_idx) = outputs_and_grads(_reference_branches)
  sort = lambda i: jnp.sort(jnp.where(i < 0, 99, i), axis=-1)
  np.testing.assert_array_equal(sort(idx), sort(r_idx))
  np.testing.assert_allclose(o_cmp, r_cmp, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(o_slc, r_slc, atol=1e-5, rtol=1e-5)
  for name, a, b in zip(("q", "k", "v", "kc", "vc"), g, g_ref):
    assert float(jnp.abs(b).max()) > 0, name
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("heads,kv_heads,length", [(8, 2, 66)])
def test_importance_topn_selected_forward_other_groupings(heads, kv_heads, length):
  q, k, v, kc, vc = _inputs(jax.random.key(length), length, heads, kv_heads)
  ns = SIZES.num_select_blocks(length)
  imp = jax.jit(lambda q, kc: kernels.block_importance(q, kc, sizes=SIZES))(q, kc)
  # the references jitted: one compile each, not one per eager op (CPU suite time)
  r_imp = jax.jit(lambda q, kc: nsa.block_importance_reference(q, kc, sizes=SIZES, num_select=ns))(q, kc)
  visible = jnp.arange(ns)[None, :] <= (jnp.arange(length) // SIZES.select_block)[:, None]
  np.testing.assert_allclose(jnp.where(visible, imp, 0), jnp.where(visible, r_imp, 0), atol=1e-5)
  idx = kernels.select_topn(r_imp, sizes=SIZES)
  r_idx = jax.jit(lambda imp: nsa.select_blocks(imp, sizes=SIZES))(r_imp)
  np.testing.assert_array_equal(idx, r_idx)
  t = np.arange(length)
  assert (np.asarray(idx) == 0).any(-1).all()                                        # initial block
  assert (np.asarray(idx) == (t // SIZES.select_block)[:, None]).any(-1).all()     # own block
  o = jax.jit(lambda *a: kernels.selected_attention(*a, sizes=SIZES))(q, k, v, idx)
  r_o = jax.jit(lambda *a: nsa.selected_attention_reference(*a, select_block=16))(q, k, v, idx)
  np.testing.assert_allclose(o, r_o, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("group", [16, 3])
def test_gpu_bf16_paper_sizes(group):
  sizes, length = nsa.NSASizes(), 2017   # odd: Nc = 125 blocks, an odd length for cuDNN too
  args = _inputs(jax.random.key(group), length, 4 * group, 4, dim=128, dtype=jnp.bfloat16, sizes=sizes)
  o_cmp, o_slc, idx = jax.jit(lambda *a: kernels.nsa_cmp_slc(*a, sizes=sizes, return_selection=True))(*args)
  up = [a.astype(jnp.float32) for a in args]
  r_cmp = nsa.compressed_attention_reference(*up[:1], up[3], up[4], sizes=sizes)
  r_slc = nsa.selected_attention_reference(up[0], up[1], up[2], idx, select_block=sizes.select_block)
  rel = lambda a, b: float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))
  assert rel(o_cmp, r_cmp) < 1e-2 and rel(o_slc, r_slc) < 1e-2
  # the kernels' top-n against the reference top-n of the upcast inputs: near-ties may swap
  r_imp = nsa.block_importance_reference(up[0], up[3], sizes=sizes, num_select=sizes.num_select_blocks(length))
  sort = lambda i: jnp.sort(jnp.where(i < 0, 10 ** 6, i), axis=-1)
  same = jnp.all(sort(idx) == sort(nsa.select_blocks(r_imp, sizes=sizes)), axis=-1)
  assert float(jnp.mean(same)) > 0.97
  # the selected backward, its dQ both ways: recomputed from K and V, or from the dS that dK/dV stores
  w = jax.random.normal(jax.random.key(7), o_slc.shape)
  loss_r = lambda *a: jnp.sum(nsa.selected_attention_reference(*a, idx, select_block=64) * w)
  g_ref = jax.jit(jax.grad(loss_r, argnums=(0, 1, 2)))(*up[:3])
  for from_ds in (False, True):
    tn = kernels.Tuning(sel_dq_from_ds=from_ds)
    loss_k = lambda *a, tn=tn: jnp.sum(
        kernels.selected_attention(*a, idx, sizes=sizes, tuning=tn).astype(jnp.float32) * w)
    g = jax.jit(jax.grad(loss_k, argnums=(0, 1, 2)))(*args[:3])
    for name, a, b in zip("qkv", g, g_ref):
      assert rel(a, b) < 2e-2, (from_ds, name)
  # the compressed branch on both paths: the Pallas kernels (nsa_cmp_fwd, nsa_cmp_dq, nsa_cmp_dkdv at the
  # shipped tiles) and cuDNN (nsa_cmp_cudnn, the default on a GPU); o, LSE2 and the gradients
  w = jax.random.normal(jax.random.key(8), o_cmp.shape)
  loss_r = lambda q, kc, vc: jnp.sum(nsa.compressed_attention_reference(q, kc, vc, sizes=sizes) * w)
  g_ref = jax.jit(jax.grad(loss_r, argnums=(0, 1, 2)))(up[0], up[3], up[4])
  lse = {}
  for path in ("pallas", "cudnn"):
    tn = kernels.Tuning(cmp_attention=path)
    o, lse[path] = jax.jit(lambda q, kc, vc, tn=tn: kernels.compressed_attention(
        q, kc, vc, sizes=sizes, tuning=tn, return_lse=True))(args[0], args[3], args[4])
    assert rel(o, r_cmp) < 1e-2, path
    loss_k = lambda q, kc, vc, tn=tn: jnp.sum(
        kernels.compressed_attention(q, kc, vc, sizes=sizes, tuning=tn).astype(jnp.float32) * w)
    g = jax.jit(jax.grad(loss_k, argnums=(0, 1, 2)))(args[0], args[3], args[4])
    for name, a, b in zip(("q", "kc", "vc"), g, g_ref):
      assert rel(a, b) < 2e-2, (path, name)
  assert np.isinf(np.asarray(lse["cudnn"][:, :sizes.block_len - 1])).all()
  np.testing.assert_allclose(np.asarray(lse["cudnn"]), np.asarray(lse["pallas"]), atol=2e-3, rtol=1e-4)


def test_mosaic_selected_probe_lowers_on_cpu():
  """experiments/probe_nsa_sel_mgpu.py (warp-specialized TMA ring + wgmma) lowers for CUDA."""
  from experiments import probe_nsa_sel_mgpu   # pylint: disable=g-import-not-at-top
  for config in (probe_nsa_sel_mgpu.Config(), probe_nsa_sel_mgpu.Config(pipeline=True, idx_in_smem=True),
                 probe_nsa_sel_mgpu.Config(pingpong=True)):
    assert probe_nsa_sel_mgpu.lower_for_cuda(config=config) > 0
  assert probe_nsa_sel_mgpu.Config(consumers=3).consumer_registers < 160   # refused, see unsupported()


@pytest.mark.gpu
@pytest.mark.skipif(hopper_unavailable(False) is not None, reason="needs an sm_90 GPU")
def test_mosaic_selected_probe_matches_triton_and_reference_on_gpu():
  """The Mosaic probe's (o, LSE2) equal the Triton kernel's, and o the reference, at an odd length
  with empty slots (positions before the 16th block have fewer than n blocks)."""
  from experiments import probe_nsa_sel_mgpu as probe   # pylint: disable=g-import-not-at-top
  sizes, length = nsa.NSASizes(), 1000
  q, k, v, kc, _ = _inputs(jax.random.key(3), length, 64, 4, dim=128, dtype=jnp.bfloat16, sizes=sizes)
  geo = kernels.geometry(q, k, sizes=sizes)
  imp = kernels.block_importance(q, kc, sizes=sizes)
  idx = kernels.select_topn(imp, sizes=sizes).reshape(-1, length, sizes.num_selected)
  assert (idx < 0).any()
  o_t, l_t = kernels._sel_fwd(q, k, v, idx, geo, kernels.Tuning(), False)  # pylint: disable=protected-access
  o_m, l_m = probe._call(geo)(kernels.to_rows(q, geo.group), k, v, idx)  # pylint: disable=protected-access
  o_t = kernels.to_rows(o_t, geo.group)      # the probe keeps the rows layout of sessions 1-13
  np.testing.assert_allclose(np.asarray(o_m, np.float32), np.asarray(o_t, np.float32), atol=2e-2, rtol=2e-2)
  np.testing.assert_allclose(np.asarray(l_m), np.asarray(l_t), atol=1e-4, rtol=1e-5)
  up = [a.astype(jnp.float32) for a in (q, k, v)]
  ref = nsa.selected_attention_reference(*up, idx.reshape(1, 4, length, -1), select_block=64)
  o = kernels.from_rows(o_m, 1, geo.group).astype(jnp.float32)
  assert float(jnp.linalg.norm(o - ref) / jnp.linalg.norm(ref)) < 1e-2


# importance's tiles and head sums: 8 positions a program, 4 selection blocks (16 compressed keys) a
# step, so a step's last compressed blocks spill into the next step's first selection block
@pytest.mark.parametrize("head_sum", ["reshape", "rebin"])
def test_importance_tiles_and_head_sums(head_sum):
  length = 75
  q, _, _, kc, _ = _inputs(jax.random.key(5), length, 6, 2)
  tuning = kernels.Tuning(importance_sum=head_sum, importance_positions=8, importance_blocks=4)
  imp = jax.jit(lambda q, kc: kernels.block_importance(q, kc, sizes=SIZES, tuning=tuning))(q, kc)
  ns = SIZES.num_select_blocks(length)
  ref = jax.jit(lambda q, kc: nsa.block_importance_reference(q, kc, sizes=SIZES, num_select=ns))(q, kc)
  visible = jnp.arange(ns)[None, :] <= (jnp.arange(length) // SIZES.select_block)[:, None]
  assert float(jnp.abs(jnp.where(visible, ref, 0)).max()) > 0
  np.testing.assert_allclose(jnp.where(visible, imp, 0), jnp.where(visible, ref, 0), atol=1e-5)


# ties everywhere (importance drawn from 4 values), and 2 forced initial blocks, so positions of
# block 0 also take block 1 (forced, though its keys are all masked later), as the reference does
# 150 positions: the last program's tile is part-empty at 4, 8 (the default) and 16 positions
@pytest.mark.parametrize("positions", [4, 8, 16])
def test_topn_rounds_equal_the_reference_with_ties(positions):
  sizes = nsa.NSASizes(block_len=8, block_stride=4, select_block=16, num_selected=5, window=16, num_initial=2)
  length = 150
  ns = sizes.num_select_blocks(length)
  imp = jax.random.randint(jax.random.key(9), (1, 2, length, ns), 0, 4).astype(jnp.float32)
  idx = kernels.select_topn(imp, sizes=sizes, tuning=kernels.Tuning(topn_positions=positions))
  np.testing.assert_array_equal(idx, nsa.select_blocks(imp, sizes=sizes))
  assert (np.asarray(idx) == -1).any() and (np.asarray(idx[:, :, :16]) == 1).any(-1).all()


def _causal_attention_with_lse(q, k, v, scale):
  """Plain-jnp causal GQA attention with cuDNN's contract: q [B, T, N, D], k/v [B, T, K, *] ->
  o [B, T, N, Dv], natural-log LSE [B, N, T]."""
  rep = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
  s = jnp.einsum("btnd,bsnd->bnts", q, k) * scale
  s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, -jnp.inf)
  lse = jax.nn.logsumexp(s, axis=-1)
  return jnp.einsum("bnts,bsnd->btnd", jnp.exp(s - lse[..., None]), v), lse


# lengths: L - l + 1 a multiple of d (8 + 4·k - 1: 39), not (75), two compressed blocks (13)
@pytest.mark.parametrize("length", [39, 75, 13])
def test_compressed_branch_as_square_causal_attention(length):
  """nsa_cmp_cudnn's layout (what runs on cuDNN on a GPU) with a plain causal attention in cuDNN's
  place: o, LSE2 and the gradients equal the reference's and the Pallas kernel's, G = 3, batch 2."""
  q, _, _, kc, vc = _inputs(jax.random.key(length), length, 6, 2, v_dim=8, batch=2)
  w = jax.random.normal(jax.random.key(1), (2, length, 6, 8))
  scale = 0.3

  def via_layout(q, kc, vc):
    return nsa_cmp_cudnn.compressed_attention(q, kc, vc, block_len=SIZES.block_len,
                                              block_stride=SIZES.block_stride, scale=scale,
                                              attention=_causal_attention_with_lse)

  def reference(q, kc, vc):
    return nsa.compressed_attention_reference(q, kc, vc, sizes=SIZES, scale=scale), None

  pallas = kernels.Tuning(cmp_attention="pallas")
  o_p, lse_p = kernels.compressed_attention(q, kc, vc, sizes=SIZES, scale=scale, tuning=pallas,
                                            return_lse=True)
  def loss(*args, branch):
    o, lse = branch(*args)
    return jnp.sum(o * w), (o, lse)

  results = [jax.jit(jax.grad(functools.partial(loss, branch=branch), argnums=(0, 1, 2), has_aux=True))(q, kc, vc)
             for branch in (via_layout, reference)]
  (g, (o, lse)), (g_ref, (o_ref, _)) = results
  chex.assert_shape(lse, (2, length, 6))
  np.testing.assert_allclose(o, o_ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(o, o_p, atol=1e-5, rtol=1e-5)
  assert np.isinf(np.asarray(lse[:, :SIZES.block_len - 1])).all()
  np.testing.assert_allclose(lse, lse_p, atol=1e-5, rtol=1e-5)
  for name, a, b in zip(("q", "kc", "vc"), g, g_ref):
    assert float(jnp.abs(b).max()) > 0, name
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4, err_msg=name)


def test_compressed_branch_before_the_first_block_ends():
  """L < l: no compressed block, so o = 0 and LSE2 = +inf on both paths (the layout's would have
  padded l - 1 positions onto a shorter sequence)."""
  q, _, _, kc, vc = _inputs(jax.random.key(2), 5, 4, 2)
  assert kc.shape[1] == 0
  o, lse = kernels.compressed_attention(q, kc, vc, sizes=SIZES, return_lse=True)
  o2, lse2 = nsa_cmp_cudnn.compressed_attention(q, kc, vc, block_len=8, block_stride=4, scale=1.0,
                                                attention=_causal_attention_with_lse)
  for out, l in ((o, lse), (o2, lse2)):
    chex.assert_shape(out, (1, 5, 4, 16))
    chex.assert_shape(l, (1, 5, 4))
    assert not np.asarray(out).any() and np.isinf(np.asarray(l)).all()


def test_cmp_attention_choice():
  with pytest.raises(ValueError, match="Tuning.cmp_attention must be one of .*got cmp_attention='cuda'"):
    kernels.Tuning(cmp_attention="cuda")
  q, _, _, kc, vc = _inputs(jax.random.key(0), 40, 4, 2)
  if jax.default_backend() == "cpu":
    with pytest.raises(NotImplementedError, match="cmp_attention='cudnn'.*needs a GPU"):
      kernels.compressed_attention(q, kc, vc, sizes=SIZES, tuning=kernels.Tuning(cmp_attention="cudnn"))
  # "auto" on a CPU, and on a GPU for float32 inputs, is the Pallas kernel
  np.testing.assert_array_equal(kernels.compressed_attention(q, kc, vc, sizes=SIZES),
                                kernels.compressed_attention(q, kc, vc, sizes=SIZES,
                                                             tuning=kernels.Tuning(cmp_attention="pallas")))


@pytest.mark.parametrize("field", ["cmp_rows", "cmp_dq_bk", "cmp_dkdv_bk", "cmp_dkdv_rows", "importance_positions",
                                   "topn_positions"])
def test_tuning_tiles_must_be_powers_of_two(field):
  with pytest.raises(ValueError, match=f"Tuning.{field} must be a power of two, got {field}=48"):
    kernels.Tuning(**{field: 48})


def test_tuning_from_string():
  assert kernels.Tuning.from_string("") == kernels.Tuning()
  assert kernels.Tuning.from_string(" sel_dq_from_ds=True, cmp_attention=pallas,topn_warps=None,topn_positions=4") == \
      kernels.Tuning(sel_dq_from_ds=True, cmp_attention="pallas", topn_warps=None, topn_positions=4)
  for text, match in (("foo=1", "'foo=1' is not field=value with a field of pallas_kernels.nsa.Tuning"),
                      ("topn_positions", "'topn_positions' is not field=value"),
                      ("topn_positions=x", "topn_positions takes int, got topn_positions='x'"),
                      ("sel_dq_from_ds=yes", "sel_dq_from_ds takes bool, got sel_dq_from_ds='yes'"),
                      ("num_warps=None", "num_warps takes int, got num_warps='None'"),
                      ("topn_positions=6", "Tuning.topn_positions must be a power of two")):
    with pytest.raises(ValueError, match=match):
      kernels.Tuning.from_string(text)


def test_kernel_tuning_reaches_the_kernels_from_nsa_and_the_model_config():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from lca import model as model_lib  # pylint: disable=g-import-not-at-top
  q, k, v, kc, vc = _inputs(jax.random.key(0), 70, 4, 2)
  gates = jax.random.uniform(jax.random.key(1), (1, 70, 4, 3))
  # a float32 case that cuDNN cannot run, on any backend: the forced choice must raise
  with pytest.raises(NotImplementedError, match="cmp_attention='cudnn'"):
    nsa.nsa(q, k, v, kc, vc, gates, sizes=SIZES, implementation="pallas",
            kernel_tuning=kernels.Tuning(cmp_attention="cudnn"))
  cfg = dict(layer_pattern="N", num_layers=1, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64)
  model = model_lib.Transformer(model_lib.ModelConfig(**cfg, nsa_kernel_tuning="sel_dq_from_ds=True"),
                                rngs=nnx.Rngs(0))
  assert model.blocks[0].mixer.kernel_tuning == kernels.Tuning(sel_dq_from_ds=True)
  with pytest.raises(ValueError, match="sel_dq_from_ds takes bool, got sel_dq_from_ds='yes'"):
    model_lib.Transformer(model_lib.ModelConfig(**cfg, nsa_kernel_tuning="sel_dq_from_ds=yes"), rngs=nnx.Rngs(0))


def test_branch_streams_change_nothing_but_placement():
  """Tuning(branch_streams=True) wraps the compressed and window branches in stream annotations
  (honoured by XLA on GPUs only under a flag): the same values and gradients, and the annotations
  reach the lowered forward+backward."""
  q, k, v, kc, vc = _inputs(jax.random.key(2), 70, 4, 2)
  gates = jax.random.uniform(jax.random.key(3), (1, 70, 4, 3))
  args = (q, k, v, kc, vc, gates)

  def grads(tuning):
    loss = lambda *a: jnp.sum(nsa.nsa(*a, sizes=SIZES, implementation="pallas", kernel_tuning=tuning) ** 2)
    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6))))

  on = grads(kernels.Tuning(branch_streams=True))
  for x, y in zip(jax.tree.leaves(grads(kernels.Tuning())(*args)), jax.tree.leaves(on(*args))):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
  text = on.lower(*args).as_text()
  assert '_xla_stream_annotation = "1"' in text and '_xla_stream_annotation = "2"' in text


def test_work_list_covers_each_selected_pair_once_in_items_of_one_block():
  sizes = nsa.NSASizes(block_len=8, block_stride=4, select_block=16, num_selected=5, window=16)
  length, item_size = 300, 7
  geo = kernels.geometry(jnp.zeros((2, length, 4, 16)), jnp.zeros((2, length, 2, 16)), sizes=sizes)
  idx = jax.random.randint(jax.random.key(4), (4, length, 5), -1, geo.num_select_blocks)
  sorted_t, items, pairs = (np.asarray(x) for x in kernels.work_list(idx, geo, item_size))
  idx = np.asarray(idx).reshape(4, -1)
  for bh in range(4):
    seen = []
    for block, lo, hi in items[bh]:
      if block < 0:
        assert lo == hi == 0
        continue
      assert 0 < hi - lo <= item_size
      entries = pairs[bh, lo:hi]
      assert (idx[bh, entries] == block).all() and (sorted_t[bh, lo:hi] == entries // 5).all()
      seen.extend(entries)
    assert sorted(seen) == sorted(np.flatnonzero(idx[bh] >= 0))
