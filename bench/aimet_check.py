"""AIMET interop: does AIMET's own loader accept an export's encodings, and does AIMET's simulation of them
compute what the exported QDQ graph computes on onnxruntime's CPU provider?

    .venv-aimet/bin/python bench/aimet_check.py EXPORT                  # prefill and decode, 4 windows
    .venv-aimet/bin/python bench/aimet_check.py EXPORT --graphs prefill --windows 8 --json

Runs in its own venv (aimet-onnx pins its own stack; see docs/deploy.md "AIMET interop" for how to make
it). For each graph of the export it:

1. reads the QDQ graph's quantizers (the independent truth: tensor, bits and signedness from the zero
   point's dtype, per-channel axis, scale, zero point) and checks the ``.encodings`` file names exactly
   those tensors with the same settings;
2. folds the QDQ pairs out (``devicelab.qdq.strip_qdq``, the graph the encodings are keyed by), gives each
   consumer of a shared initializer its own copy (AIMET refuses shared weights across op types: the tied
   embedding / lm_head), and builds AIMET's ``QuantizationSimModel`` on it;
3. configures the sim's quantizers from the QDQ graph: only those tensors enabled, with their bit width,
   symmetry and granularity. Tensors AIMET's default placement leaves unquantized (outputs of data-movement
   ops such as Transpose, Gather, Identity) get a quantizer through AIMET's own ``_add_missing_quantizers``,
   as its non-strict loader would do;
4. loads the ``.encodings`` file with ``load_encodings_to_sim(strict=True)``: any disagreement in names,
   bit width, symmetry or granularity is a refusal, reported with AIMET's message;
5. reads back what AIMET loaded (``AffineEncoding.from_quantizer``) and compares it with the QDQ graph:
   dtype, scale (relative), offset (AIMET's ``x_q = round(x / scale - offset)``, so it must be ``-zero_point``
   exactly) and channel axis;
6. runs both on real token windows (``--tokens ids.npy``, or the export's tokenizer on the evaluation
   corpus through the main venv's ``quant.data``): logits' max |difference| relative to the reference's
   logit range, mean |difference| against the activations' own quantization error (QDQ graph against the
   stripped graph run in float), top-1 agreement, and the K/V outputs compared as uint8 codes. Decode runs
   one step per window at position T-1 from the prefill's uint8 cache;
7. does it again with each *partially quantized* tensor split in two (see ``partially_quantized``): the
   QDQ graph quantizes a norm's input but not the residual branch of the same tensor, which a format keyed
   by tensor name cannot express, so "as loaded" shows what AIMET/QNN compute from the file and "split"
   shows the encodings themselves reproduce the QDQ graph.

Why not bit-exact: AIMET's quantizer (libpymo's C++ kernel) is not ONNX's ``round(x / scale) + zero_point``
in float32. Given the same input it lands one code apart wherever x / scale is within about 0.002 of a
.5 boundary on a 16-bit grid (x / scale = 2338.4988 became 2339), about 0.2% of a 16-bit tensor's codes;
each flipped code moves the float ops after it, and the drift grows with depth (docs/deploy.md).

Exit status 0 when every graph was accepted in strict mode, every loaded encoding equals the QDQ graph's,
and the split outputs (or the loaded ones, where nothing needed splitting) have a mean logit difference of
at most ``--max-err-ratio`` (0.1) times the activations' quantization error and top-1 agreement of at
least ``--min-top1`` (99%); 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # devicelab (no quant import: it needs only onnx and onnxruntime)

from devicelab.exported import read_export  # noqa: E402
from devicelab.qdq import strip_qdq  # noqa: E402
from devicelab.runtime import cpu_eval_session  # noqa: E402

_ZP_DTYPES = {  # ONNX TensorProto elem type of the zero point -> (bits, signed)
    2: (8, False), 3: (8, True), 4: (16, False), 5: (16, True), 21: (4, False), 22: (4, True),
}


def log(msg: str) -> None:
    print(f"[aimet-check] {msg}", file=sys.stderr, flush=True)


def qdq_quantizers(model) -> dict:
    """Every quantizer of an exported QDQ graph, keyed as the AIMET writer keys them.

    Activations by the float tensor entering QuantizeLinear (a Q that produces a graph output: by that
    output's name; a DQ of an integer graph input: by the input's name), weights by the DQ output.
    Value: kind (param | act), bits, signed, axis (None = per-tensor), scale and zero point (1-D arrays).
    """
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    outputs = {o.name for o in g.output}
    inputs = {i.name: i for i in g.input}
    consumers: dict[str, list] = {}
    for n in g.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)

    def site(n, kind):
        zp = inits.get(n.input[2]) if len(n.input) > 2 else None
        if zp is None:
            raise ValueError(f"{n.op_type} {n.name!r} has no initializer zero point: cannot tell its dtype")
        bits, signed = _ZP_DTYPES[zp.data_type]
        scale = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32).reshape(-1)
        zpv = numpy_helper.to_array(zp).astype(np.int64).reshape(-1)
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1) if scale.size > 1 else None
        return {"kind": kind, "bits": bits, "signed": signed, "axis": axis, "scale": scale, "zero_point": zpv}

    def cache_output(n):
        """The graph output a per-layer cache QuantizeLinear feeds through DQ -> Concat -> Q, if it does."""
        outs = set()
        for dq in consumers.get(n.output[0], []):
            for cat in consumers.get(dq.output[0], []) if dq.op_type == "DequantizeLinear" else [None]:
                for q in consumers.get(cat.output[0], []) if cat is not None and cat.op_type == "Concat" else [None]:
                    outs.add(q.output[0] if q is not None and q.op_type == "QuantizeLinear" else None)
        return outs.pop() if len(outs) == 1 and None not in outs and outs <= outputs else None

    table, requant = {}, {}
    for n in g.node:
        if n.op_type == "QuantizeLinear" and n.output[0] not in outputs and cache_output(n):
            # Re-quantizes the layer's K/V with the shared cache encoding for the k_out/v_out Concat. In a
            # format keyed by tensor name the graph output's entry stands for it (Q.DQ.Q = Q, Concat keeps
            # the grid), so it is checked against that entry instead of keyed by its input.
            requant[n.name] = (cache_output(n), site(n, "act"))
            continue
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            table[n.output[0]] = site(n, "param")
        elif n.op_type == "DequantizeLinear" and n.input[0] in inputs:
            table[n.input[0]] = site(n, "act")
        elif n.op_type == "QuantizeLinear":
            name = n.output[0] if n.output[0] in outputs else n.input[0]
            s = site(n, "act")
            if name in table and not (np.array_equal(table[name]["scale"], s["scale"])
                                      and np.array_equal(table[name]["zero_point"], s["zero_point"])):
                raise ValueError(f"tensor {name!r} is quantized twice with different encodings")
            table[name] = s
    _drop_lossless_restacks(g, table)
    for qname, (out, s) in requant.items():
        t = table[out]
        if not (np.allclose(s["scale"], t["scale"], rtol=1e-6, atol=0)
                and np.array_equal(s["zero_point"], t["zero_point"])):
            raise ValueError(f"cache QuantizeLinear {qname!r} does not use {out}'s encoding: the {out} entry cannot "
                             f"stand for it")
    return table


def _grid(t: dict) -> tuple[np.ndarray, np.ndarray]:
    qmin, qmax = (-(2 ** (t["bits"] - 1)), 2 ** (t["bits"] - 1) - 1) if t["signed"] else (0, 2 ** t["bits"] - 1)
    scale = t["scale"].astype(np.float64)
    return (qmin - t["zero_point"]) * scale, (qmax - t["zero_point"]) * scale


def _drop_lossless_restacks(g, table: dict) -> None:
    """A QDQ pair on a DequantizeLinear output (the device table's stacked pairs) re-quantizes a quantized
    tensor; a float graph has no tensor of that name. Where its grid holds every value of the pair below
    (integer scale ratio, same min), it changes nothing: it is not a quantizer of the float graph (the writer
    drops its entry the same way)."""
    producers = {o: n for n in g.node for o in n.output}

    def base(name):
        dq = producers.get(name)
        q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        return q.input[0] if q is not None and q.op_type == "QuantizeLinear" else None

    for name in [n for n, t in table.items() if t["kind"] == "act" and base(n) is not None]:
        b = base(name)
        while b not in table and base(b) is not None:
            b = base(b)
        if b not in table or table[b]["scale"].size != 1 or table[name]["scale"].size != 1:
            continue
        (lo_b, hi_b), (lo_n, hi_n) = _grid(table[b]), _grid(table[name])
        k = float(table[b]["scale"][0]) / float(table[name]["scale"][0])
        tol = 1e-6 * float(table[b]["scale"][0])
        if (round(k) >= 1 and abs(k - round(k)) <= 1e-6 * k and abs(lo_n[0] - lo_b[0]) <= tol
                and hi_n[0] >= hi_b[0] - tol):
            del table[name]


def file_vs_graph(enc: dict, table: dict) -> list[str]:
    """Our own check of the .encodings file against the QDQ graph (before AIMET sees it)."""
    problems = []
    acts, params = enc["activation_encodings"], enc["param_encodings"]
    for name in sorted(set(acts) & set(params)):
        problems.append(f"{name}: in both activation_encodings and param_encodings")
    entries = {**acts, **params}
    for name in sorted(set(table) - set(entries)):
        problems.append(f"{name}: quantized in the graph, no entry in the file")
    for name in sorted(set(entries) - set(table)):
        problems.append(f"{name}: entry in the file, not quantized in the graph")
    for name in sorted(set(entries) & set(table)):
        t, e = table[name], entries[name]
        where = "param_encodings" if t["kind"] == "param" else "activation_encodings"
        if name not in (params if t["kind"] == "param" else acts):
            problems.append(f"{name}: should be in {where}")
        if len(e) != t["scale"].size:
            problems.append(f"{name}: {len(e)} entries, graph has {t['scale'].size} channels")
            continue
        for i, x in enumerate(e):
            if x["bitwidth"] != t["bits"] or (x["is_symmetric"] == "True") != t["signed"]:
                problems.append(f"{name}[{i}]: bitwidth {x['bitwidth']} symmetric {x['is_symmetric']}, graph "
                                f"{t['bits']}-bit {'signed' if t['signed'] else 'unsigned'}")
                break
    return problems


def partially_quantized(qdq_model, table: dict) -> dict:
    """Tensors the QDQ graph quantizes differently for different consumers.

    Two cases: the schemes quantize a norm's *input* (role norm.in) while the residual branch of the same
    tensor stays float; and the prefill's K/V feed the attention through their attn.k / attn.v encoding
    but the cache outputs through the shared cache encoding (which differs from a layer's own once there
    are several layers). A format keyed by tensor name cannot say either: AIMET (and QNN) put one encoding
    on the tensor and every consumer sees it, so k_out = Q_cache(Q_attn(K)). Value: the (node name, input
    index) pairs that read the tensor other than through its entry's encoding (float, or re-quantized to
    another grid downstream).
    """
    from onnx import numpy_helper

    g = qdq_model.graph
    inits = {t.name: t for t in g.initializer}
    q_nodes = {n.output[0]: n for n in g.node if n.op_type == "QuantizeLinear"}
    dq_of = {n.output[0]: q_nodes[n.input[0]] for n in g.node
             if n.op_type == "DequantizeLinear" and n.input[0] in q_nodes}

    def own_grid(q) -> bool:
        t = table.get(q.input[0])
        scale = numpy_helper.to_array(inits[q.input[1]]).astype(np.float32).reshape(-1)
        return t is not None and np.allclose(scale, t["scale"], rtol=1e-6, atol=0)

    quantized, others = set(), {}
    for n in g.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, x in enumerate(n.input):
            if x in dq_of and own_grid(dq_of[x]):
                quantized.add(dq_of[x].input[0])
            elif x in dq_of:
                others.setdefault(dq_of[x].input[0], []).append((n.name, i))
            elif x in table and table[x]["kind"] == "act":
                others.setdefault(x, []).append((n.name, i))
    return {t: uses for t, uses in others.items() if t in quantized}


def split_consumers(model, partial: dict) -> None:
    """Give each partially quantized tensor T a float twin: the producer writes ``T.float``, the float
    consumers read it, and an Identity makes ``T`` for the quantized ones, so T's encoding reaches only
    those (what the QDQ graph computes). Diagnostic: it separates the format's limit from the encodings."""
    from onnx import helper

    g = model.graph
    nodes = list(g.node)
    by_name = {}
    for n in nodes:  # the first of a name: strip_qdq's output Identity may repeat an exporter node's name
        by_name.setdefault(n.name, n)
    out = []
    for n in nodes:
        out.append(n)
        for j, o in enumerate(n.output):
            if o in partial:
                n.output[j] = f"{o}.float"
                out.append(helper.make_node("Identity", [f"{o}.float"], [o], name=f"{o}.quantized_branch"))
                for name, i in partial[o]:
                    by_name[name].input[i] = f"{o}.float"
    del g.node[:]
    g.node.extend(out)


def _configure(sim, table: dict) -> list[str]:
    """Enable exactly the graph's quantizers in the sim, with the graph's settings; returns the tensors that
    needed a quantizer AIMET does not place by default."""
    from aimet_onnx.common.defs import qtype
    from aimet_onnx.quantsim import _add_missing_quantizers

    missing = [n for n in table if n not in sim.qc_quantize_op_dict]
    if missing:
        _add_missing_quantizers(sim, [n for n in missing if table[n]["kind"] == "param"],
                                [n for n in missing if table[n]["kind"] == "act"])
    for name, q in sim.qc_quantize_op_dict.items():
        t = table.get(name)
        if t is None:
            q.enabled = False
            continue
        q.enabled = True
        q.set_precision(qtype.int(t["bits"]))
        q.use_symmetric_encodings = t["signed"]
        q.enable_per_channel_quantization(t["axis"] is not None)
    return missing


def loaded_vs_graph(sim, table: dict) -> dict:
    """What AIMET loaded, against the QDQ graph: dtype, scale, offset = -zero_point, channel axis."""
    from aimet_onnx._encoding import AffineEncoding

    exact, problems, worst_scale = 0, [], 0.0
    for name, t in table.items():
        q = sim.qc_quantize_op_dict[name]
        e = AffineEncoding.from_quantizer(q)
        if e is None:
            problems.append(f"{name}: no encoding loaded (quantizer disabled)")
            continue
        want_dtype = f"{'int' if t['signed'] else 'uint'}{t['bits']}"
        scale, offset = np.asarray(e.scale, np.float64).reshape(-1), np.asarray(e.offset, np.float64).reshape(-1)
        bad = []
        if e.dtype != want_dtype:
            bad.append(f"dtype {e.dtype} (graph {want_dtype})")
        if scale.size != t["scale"].size:
            bad.append(f"{scale.size} scales (graph {t['scale'].size})")
        else:
            rel = float(np.max(np.abs(scale - t["scale"]) / t["scale"]))
            worst_scale = max(worst_scale, rel)
            if rel > 1e-6:
                bad.append(f"scale off by {rel:.2e} relative")
            if not np.array_equal(offset, -t["zero_point"].astype(np.float64)):
                i = int(np.argmax(offset != -t["zero_point"]))
                bad.append(f"offset {offset[i]:g}, graph zero point {t['zero_point'][i]} (expected offset "
                           f"{-t['zero_point'][i]})")
        if t["axis"] is not None and e.channel_axis != t["axis"]:
            bad.append(f"channel axis {e.channel_axis} (graph {t['axis']})")
        if bad:
            problems.append(f"{name}: " + "; ".join(bad))
        else:
            exact += 1
    return {"exact": exact, "problems": problems, "max_scale_rel_err": worst_scale}


def token_windows(exp, n: int, tokens: str | None, main_python: str) -> np.ndarray:
    """(n, T) int64 token ids: from a .npy file, or the export's tokenizer on the evaluation corpus (main venv)."""
    t = int(exp.index["graphs"]["prefill"]["prompt_len"])
    if tokens:
        ids = np.load(tokens).astype(np.int64)
    else:
        code = ("import sys, numpy as np; from transformers import AutoTokenizer; from quant import data; "
                "tok = AutoTokenizer.from_pretrained(sys.argv[1]); "
                "w = data.eval_windows(tok, int(sys.argv[2]), limit=int(sys.argv[3]), add_bos=sys.argv[4] == '1'); "
                "np.save(sys.argv[5], w.numpy())")
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "ids.npy"
            subprocess.run([main_python, "-c", code, str(exp.root / "tokenizer"), str(t), str(n),
                            "1" if exp.index.get("add_bos") else "0", str(out)], check=True, cwd=ROOT)
            ids = np.load(out)
    if ids.ndim != 2 or ids.shape[1] != t:
        raise SystemExit(f"token windows must be (N, {t}) for this export's prefill, got {ids.shape}")
    return ids[:n]


def _dequant(codes: np.ndarray, kv: dict) -> np.ndarray:
    return ((codes.astype(np.float32) - np.float32(kv["offset"])) * np.float32(kv["scale"])).astype(np.float32)


def _quant(x: np.ndarray, kv: dict) -> np.ndarray:
    return np.clip(np.rint(x / np.float32(kv["scale"])) + kv["offset"], 0, 255).astype(np.uint8)


def compare_outputs(name, exp, ort_sess, sim, ids: np.ndarray, float_sess) -> dict:
    """Logits and K/V of AIMET's sim against the QDQ graph on ORT CPU, one call per window.

    ``float_sess`` runs the stripped graph without activation quantizers: mean |QDQ - float| is the
    activations' quantization error, the scale against which AIMET's difference to the QDQ graph is judged.
    """
    kv = exp.index["kv_encoding"]
    t = ids.shape[1]
    rel, agree, total, kv_equal, kv_total, kv_maxdiff = 0.0, 0, 0, 0, 0, 0
    err_sum, qerr_sum = 0.0, 0.0
    prefill_sess = cpu_eval_session(exp.graph("prefill").path) if name == "decode" else None
    ctx = int(exp.index["graphs"]["decode"]["ctx"]) if name == "decode" else 0
    for w in ids:
        if name == "prefill":
            feeds = {"input_ids": w[None]}
            sim_feeds = feeds
        else:  # one step at position t-1 from the prefill's cache of positions 0..t-2
            _, ko, vo = prefill_sess.run(["logits", "k_out", "v_out"], {"input_ids": w[None]})
            shape = [d for d in next(i for i in exp.graph("decode").inputs if i["name"] == "k_cache")["shape"]]
            kc, vc = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
            kc[:, :, :t - 1], vc[:, :, :t - 1] = ko[:, :, :t - 1], vo[:, :, :t - 1]
            bias = np.full((1, ctx + 1), np.finfo(np.float32).min, np.float32)
            bias[0, :t - 1] = 0
            bias[0, ctx] = 0
            feeds = {"input_ids": w[None, t - 1:t], "position_ids": np.array([[t - 1]], np.int64),
                     "k_cache": kc, "v_cache": vc, "attention_bias": bias}
            sim_feeds = dict(feeds, k_cache=_dequant(kc, kv["k"]), v_cache=_dequant(vc, kv["v"]))
        ref_logits, ref_k, ref_v = ort_sess.run(["logits", "k_out", "v_out"], feeds)
        got_logits, got_k, got_v = sim.session.run(["logits", "k_out", "v_out"], sim_feeds)
        flt = float_sess.run(["logits"], sim_feeds)[0].reshape(-1, ref_logits.shape[-1])
        vocab = ref_logits.shape[-1]
        ref_logits, got_logits = ref_logits.reshape(-1, vocab), got_logits.reshape(-1, vocab)
        err_sum += float(np.abs(got_logits - ref_logits).mean())
        qerr_sum += float(np.abs(ref_logits - flt).mean())
        rng = float(ref_logits.max() - ref_logits.min())
        rel = max(rel, float(np.abs(got_logits - ref_logits).max()) / rng)
        agree += int((got_logits.argmax(-1) == ref_logits.argmax(-1)).sum())
        total += ref_logits.shape[0]
        for ref, got, enc in ((ref_k, got_k, kv["k"]), (ref_v, got_v, kv["v"])):
            codes = _quant(got, enc)
            kv_equal += int((codes == ref).sum())
            kv_total += ref.size
            kv_maxdiff = max(kv_maxdiff, int(np.abs(codes.astype(np.int32) - ref.astype(np.int32)).max()))
    return {"windows": int(ids.shape[0]), "positions": total, "logit_max_rel_err": rel,
            "logit_mean_err": err_sum / len(ids), "act_quant_mean_err": qerr_sum / len(ids),
            "err_over_quant_err": err_sum / qerr_sum,
            "top1_agreement": agree / total, "kv_codes_equal": kv_equal / kv_total, "kv_max_code_diff": kv_maxdiff}


def _float_session(path: Path):
    """ORT CPU on the stripped graph. strip_qdq names its output Identity ``<output>.float``, which can repeat
    an exporter node's name (the ``k_out.float`` Concat): ORT refuses duplicate node names, AIMET does not."""
    import onnx
    import onnxruntime as ort

    model, seen = onnx.load(str(path)), set()
    for i, n in enumerate(model.graph.node):
        if n.name in seen:
            n.name = f"{n.name}.{i}"
        seen.add(n.name)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _sim(spec, table: dict, work: Path, partial: dict | None = None):
    """AIMET's sim of the float graph with the graph's quantizers enabled (``partial``: split first)."""
    from aimet_onnx.quantsim import QuantizationSimModel
    from aimet_onnx.utils import duplicate_shared_initializers

    model = strip_qdq(spec.path, work / f"{spec.name}_float.onnx")
    copied = duplicate_shared_initializers(model.graph)
    if partial:
        split_consumers(model, partial)
    sim = QuantizationSimModel(model)
    default_enabled = sum(q.enabled for q in sim.qc_quantize_op_dict.values())
    return sim, copied, default_enabled, _configure(sim, table)


def check_graph(exp, name: str, ids: np.ndarray, work: Path) -> dict:
    import onnx
    from aimet_onnx.quantsim import load_encodings_to_sim

    spec = exp.graph(name)
    enc_path = exp.root / spec.meta["encodings"]
    enc = json.loads(enc_path.read_text())
    t0 = time.time()
    qdq_model = onnx.load(str(spec.path))
    table = qdq_quantizers(qdq_model)
    partial = partially_quantized(qdq_model, table)
    del qdq_model
    res = {"graph": name, "encodings": enc_path.name, "version": enc.get("version"),
           "activation_entries": len(enc["activation_encodings"]), "param_entries": len(enc["param_encodings"]),
           "graph_quantizers": len(table),
           "bits": sorted({f"{'int' if t['signed'] else 'uint'}{t['bits']}" for t in table.values()}),
           "per_channel": sum(t["axis"] is not None for t in table.values())}
    res["file_vs_graph"] = file_vs_graph(enc, table)
    log(f"{name}: {len(table)} quantizers in the QDQ graph, {res['activation_entries']} activation + "
        f"{res['param_entries']} param entries in {enc_path.name}; {len(res['file_vs_graph'])} disagreements")

    sim, res["shared_initializers_copied"], res["aimet_default_quantizers"], added = _sim(spec, table, work)
    res["added_quantizers"] = sorted(added)
    log(f"{name}: sim built ({time.time() - t0:.0f}s); {len(res['added_quantizers'])} quantizers added where "
        f"AIMET places none by default")

    try:
        mismatches = load_encodings_to_sim(sim, str(enc_path), strict=True)
        res["strict_load"] = "accepted"
        res["refused"] = [str(m) for m in mismatches]
    except (AssertionError, RuntimeError, NotImplementedError, ValueError, KeyError) as e:
        res["strict_load"] = f"refused: {type(e).__name__}: {e}"
        res["refused"] = [str(e)]
        log(f"{name}: strict load refused ({type(e).__name__}); loading non-strict to measure anyway")
        res["non_strict_mismatches"] = [str(m) for m in load_encodings_to_sim(sim, str(enc_path), strict=False)]
    accepted = sum(sim.qc_quantize_op_dict[n].enabled for n in table)
    res["accepted_activations"] = sum(sim.qc_quantize_op_dict[n].enabled for n, t in table.items()
                                      if t["kind"] == "act")
    res["accepted_params"] = accepted - res["accepted_activations"]
    res["loaded_vs_graph"] = loaded_vs_graph(sim, table)
    log(f"{name}: strict load {res['strict_load'].split(':')[0]}; {res['loaded_vs_graph']['exact']}/{len(table)} "
        f"loaded encodings equal the QDQ graph's")

    ort_sess, float_sess = cpu_eval_session(spec.path), _float_session(work / f"{name}_float.onnx")
    res["outputs"] = compare_outputs(name, exp, ort_sess, sim, ids, float_sess)
    del sim
    res["partially_quantized"] = {t: [f"{n}[{i}]" for n, i in uses] for t, uses in partial.items()}
    if partial:  # the same encodings once each partially quantized tensor has a float twin
        split, *_ = _sim(spec, table, work, partial)
        load_encodings_to_sim(split, str(enc_path), strict=res["strict_load"] == "accepted")
        res["outputs_split"] = compare_outputs(name, exp, ort_sess, split, ids, float_sess)
        log(f"{name}: {len(partial)} partially quantized tensors split; logits max|d|/range "
            f"{res['outputs']['logit_max_rel_err']:.2e} as loaded, "
            f"{res['outputs_split']['logit_max_rel_err']:.2e} split")
    res["seconds"] = round(time.time() - t0, 1)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export", help="an export folder written by `farm export`")
    ap.add_argument("--graphs", nargs="+", default=["prefill", "decode"], choices=["prefill", "decode"])
    ap.add_argument("--windows", type=int, default=4, help="token windows of the prefill length")
    ap.add_argument("--tokens", help="(N, T) int64 .npy of token ids instead of the evaluation corpus")
    ap.add_argument("--main-python", default=str(ROOT / ".venv" / "bin" / "python"),
                    help="the project's python (has transformers and quant) for tokenizing")
    ap.add_argument("--max-err-ratio", type=float, default=0.1,
                    help="pass when mean |AIMET - QDQ| logit error <= this x the activations' quantization error")
    ap.add_argument("--min-top1", type=float, default=0.99)
    ap.add_argument("--json", action="store_true", help="print the whole record as JSON on stdout")
    args = ap.parse_args(argv)

    import logging

    logging.disable(logging.INFO)  # AIMET logs every quantizer it adds or configures
    import aimet_onnx
    import onnx
    import onnxruntime
    import torch

    exp = read_export(args.export)
    versions = {"aimet_onnx": aimet_onnx.__version__, "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__, "torch": torch.__version__}
    ids = token_windows(exp, args.windows, args.tokens, args.main_python)
    log(f"{exp.root}: {exp.index.get('model')} {exp.index.get('scheme')} {exp.index.get('method')}, "
        f"{ids.shape[0]} windows x {ids.shape[1]} tokens; {versions}")
    record = {"export": str(exp.root), "export_hash": exp.content_hash, "model": exp.index.get("model"),
              "scheme": exp.index.get("scheme"), "method": exp.index.get("method"), "versions": versions,
              "graphs": []}
    with tempfile.TemporaryDirectory(prefix="aimet-check-") as work:
        for name in args.graphs:
            record["graphs"].append(check_graph(exp, name, ids, Path(work)))

    def outputs(o: dict) -> str:
        return (f"logits max|d|/range {o['logit_max_rel_err']:.2e}, mean|d| {o['err_over_quant_err']:.3f}x the "
                f"activation quantization error, top-1 {o['top1_agreement']:.2%} of "
                f"{o['positions']}, K/V codes equal {o['kv_codes_equal']:.4%} (max diff {o['kv_max_code_diff']})")

    ok = True
    for r in record["graphs"]:
        lv = r["loaded_vs_graph"]
        o = r.get("outputs_split", r["outputs"])  # the encodings' own agreement, the format's limit aside
        loaded = r["strict_load"] == "accepted" and not r["refused"] and not r["file_vs_graph"] and not lv["problems"]
        agrees = o["err_over_quant_err"] <= args.max_err_ratio and o["top1_agreement"] >= args.min_top1
        ok &= loaded and agrees
        verdict = "PASS" if loaded and agrees else "FAIL (encodings)" if not loaded else "FAIL (outputs)"
        print(f"{r['graph']:8s} {verdict}  strict load {r['strict_load'].split(':')[0]}: "
              f"{r['accepted_activations']} activation + {r['accepted_params']} param encodings accepted "
              f"({r['activation_entries']} + {r['param_entries']} in the file; {', '.join(r['bits'])}; "
              f"{r['per_channel']} per-channel), {lv['exact']}/{r['graph_quantizers']} loaded = QDQ graph "
              f"(scale rel err <= {lv['max_scale_rel_err']:.1e}); {r['seconds']}s")
        print(f"    as loaded: {outputs(r['outputs'])}")
        if "outputs_split" in r:
            print(f"    split:     {outputs(r['outputs_split'])}  ({len(r['partially_quantized'])} tensors quantized "
                  f"for some consumers only: {', '.join(r['partially_quantized'])})")
        for p in r["file_vs_graph"] + r["refused"] + lv["problems"]:
            print(f"    {p}")
        if r["added_quantizers"]:
            print(f"    quantizers added (AIMET places none there by default): {', '.join(r['added_quantizers'])}")
    if args.json:
        print(json.dumps(record, indent=1, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
