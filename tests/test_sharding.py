"""Sharding over a (data, fsdp, tensor) mesh and gradient accumulation.

The rule resolution and every bad-input error are checked in this process from axis sizes
alone. What the devices actually hold, and that a sharded run trains like the replicated one,
is checked on 8 CPU devices (``--xla_force_host_platform_device_count=8``) in subprocesses
(``_sharded_run.py``): tiny BERT, GPT-2 (causal LM) and ViT saved by transformers, fitted with
``Trainer.fit``, the shard sizes read from each leaf's ``addressable_shards``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from _tiny import make_tiny_bert, small_vader
from jax.sharding import AbstractMesh, PartitionSpec

import jaxtl
from jaxtl import parallel, sharding
from jaxtl.transfer.rules import InvalidRuleError, UnmatchedParamsError
from jaxtl.transfer.trees import flatten

HERE = os.path.dirname(os.path.abspath(__file__))
BERT_LIKE = {
    "bert": {
        "embeddings": {"word_embeddings": {"embedding": np.zeros((30522, 768), np.float32)}},
        "encoder": {
            "layer_0": {
                "attention": {
                    "self": {
                        "query": {"kernel": np.zeros((768, 768)), "bias": np.zeros(768)},
                    },
                    "output": {"dense": {"kernel": np.zeros((768, 768)), "bias": np.zeros(768)}},
                },
                "intermediate": {"dense": {"kernel": np.zeros((768, 3072))}},
                "output": {"LayerNorm": {"scale": np.zeros(768)}},
            }
        },
    },
    "classifier": {"kernel": np.zeros((768, 3)), "bias": np.zeros(3)},
}


def _structure():
    from jaxtl.models import bert

    return jaxtl.Structure(blocks=(), head=("classifier",), tensor_parallel=bert.TENSOR_PARALLEL)


def _specs(sizes, rules=None, **kw):
    specs = sharding.param_specs(BERT_LIKE, sizes, rules, structure=_structure(), **kw)
    return flatten(specs)


# --- rules -> specs, from axis sizes ----------------------------------------------------------


def test_default_rules_shard_large_leaves_over_fsdp_and_megatron_layers_over_tensor():
    specs = _specs({"data": 1, "fsdp": 4, "tensor": 2})
    layer = "bert/encoder/layer_0"
    # Column-parallel in, row-parallel out; the other dim over fsdp.
    assert specs[f"{layer}/attention/self/query/kernel"] == PartitionSpec("fsdp", "tensor")
    assert specs[f"{layer}/attention/self/query/bias"] == PartitionSpec("tensor")
    assert specs[f"{layer}/attention/output/dense/kernel"] == PartitionSpec("tensor", "fsdp")
    assert specs[f"{layer}/attention/output/dense/bias"] == PartitionSpec()
    assert specs[f"{layer}/intermediate/dense/kernel"] == PartitionSpec("fsdp", "tensor")
    # The FSDP rule: the largest dim that divides by fsdp (30522 = 2 x 15261 does not).
    assert specs["bert/embeddings/word_embeddings/embedding"] == PartitionSpec(None, "fsdp")
    # Small leaves stay whole: norms, biases, the classifier (2,304 elements < 2**16).
    assert specs[f"{layer}/output/LayerNorm/scale"] == PartitionSpec()
    assert specs["classifier/kernel"] == PartitionSpec()


def test_the_default_mesh_replicates_everything():
    specs = _specs({"data": 8})
    assert all(sharding.shard_count(s, {"data": 8}) == 1 for s in specs.values())


def test_user_rules_come_first_and_the_table_still_covers_every_param():
    rules = [(r"bert/embeddings/.*", ("tensor", None)), ("classifier/.*", "replicated")]
    specs = _specs({"fsdp": 2, "tensor": 2}, rules, min_shard_size=0)
    assert specs["bert/embeddings/word_embeddings/embedding"] == PartitionSpec("tensor", None)
    assert specs["classifier/kernel"] == PartitionSpec()
    # min_shard_size=0: the FSDP rule now splits the LayerNorm scale too.
    assert specs["bert/encoder/layer_0/output/LayerNorm/scale"] == PartitionSpec("fsdp")


def test_optimizer_state_follows_its_params_and_per_device_bytes_shrink():
    sizes = {"data": 1, "fsdp": 8, "tensor": 1}
    params = {"w": np.zeros((1024, 256), np.float32), "b": np.zeros(256, np.float32)}
    specs = sharding.param_specs(params, sizes)
    tx = jaxtl.make_plan("full", jaxtl.Structure(blocks=(), head=())).optimizer(1e-3)
    state = jax.eval_shape(tx.init, params)
    opt = sharding.state_specs(state, params, specs, sizes)
    flat = flatten(opt)
    moments = {p: s for p, s in flat.items() if p.endswith("/w")}
    assert len(moments) == 2 and all(s == PartitionSpec("fsdp") for s in moments.values())
    assert all(s == PartitionSpec() for p, s in flat.items() if p.endswith("count"))
    whole = sharding.per_device_bytes(params, jax.tree.map(lambda _: PartitionSpec(), params), {})
    assert sharding.per_device_bytes(params, specs, sizes) == (1024 * 256 // 8 + 256) * 4
    assert whole == (1024 * 256 + 256) * 4


# --- bad input: clear errors, before anything compiles ---------------------------------------


def test_a_rule_naming_an_unknown_axis_is_an_error_that_lists_the_axes():
    with pytest.raises(sharding.ShardingError, match=r"names mesh axis 'model'.*'data', 'fsdp'"):
        _specs({"fsdp": 2}, [(".*/kernel", ("model", None))])


def test_a_dim_that_does_not_divide_names_the_param_the_dim_the_axis_and_what_fits():
    with pytest.raises(sharding.ShardingError) as e:
        _specs({"data": 1, "fsdp": 4, "tensor": 5})
    msg = str(e.value)
    assert "'bert/encoder/layer_0/attention/output/dense/kernel'" in msg
    assert "dim 0 has size 768, not divisible by axis tensor = 5" in msg
    assert "divides over fsdp=4" in msg and "--shard-rule" in msg and "'replicated'" in msg


def test_a_spec_longer_than_the_leaf_and_a_malformed_rule_are_errors():
    with pytest.raises(sharding.ShardingError, match=r"3 dims.*shape \(3,\)"):
        _specs({"fsdp": 2}, [("classifier/bias", ("fsdp", None, None))])
    with pytest.raises(InvalidRuleError, match="not a PartitionSpec"):
        _specs({"fsdp": 2}, [("classifier/bias", 3)])
    with pytest.raises(InvalidRuleError, match="not a valid regular expression"):
        _specs({"fsdp": 2}, [("classifier/(", "fsdp")])


def test_rules_alone_must_cover_every_param_when_they_replace_the_defaults():
    with pytest.raises(UnmatchedParamsError, match="classifier/kernel"):
        sharding.param_specs(BERT_LIKE, {"fsdp": 2}, [("bert/.*", "fsdp")], defaults=False)


@pytest.mark.parametrize(
    "shape, message",
    [
        ("data=2,fsdp=2", r"data=2,fsdp=2,tensor=1 has 4 devices, but there are 8"),
        ("fsdp=3", r"needs a multiple of 3 devices; there are 8"),
        ("model=2", r"names axis 'model'; the axes are \['data', 'fsdp', 'tensor'\]"),
        ("fsdp:8", r"'fsdp:8' is not AXIS=SIZE"),
        ("fsdp=0", r"fsdp=0: sizes must be >= 1"),
    ],
)
def test_a_mesh_that_does_not_fit_the_devices_is_an_error(shape, message):
    with pytest.raises(ValueError, match=message):
        parallel.parse_mesh(shape, 8)


def test_mesh_sizes_default_data_to_the_devices_the_others_leave():
    assert parallel.parse_mesh("tensor=2,fsdp=2", 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert parallel.parse_mesh({"fsdp": 8}, 8) == {"data": 1, "fsdp": 8, "tensor": 1}


def test_a_batch_that_does_not_split_over_data_fsdp_and_microbatches_is_an_error():
    mesh = AbstractMesh((2, 2, 2), parallel.AXES)
    parallel.check_batch_size(16, mesh, grad_accum=4)  # 16 = 2 x 2 x 4: fine
    with pytest.raises(ValueError, match=r"= 24 must be divisible by data x fsdp = 4 batch "):
        parallel.check_batch_size(24, mesh, grad_accum=4)
    with pytest.raises(ValueError, match=r"grad_accum \(--grad-accum\) = 4 microbatches = 16"):
        parallel.check_batch_size(24, mesh, grad_accum=4)


def test_the_trainer_refuses_a_bad_rule_before_compiling(tmp_path):
    with pytest.raises(ValueError, match="names mesh axis 'model'"):
        jaxtl.TrainConfig(sharding_rules=[(".*/kernel", ("model",))])
    model = jaxtl.load(make_tiny_bert(str(tmp_path / "bert")), num_labels=2)
    # A spec longer than a param is known only from the params: init_state, before compiling.
    config = jaxtl.TrainConfig(sharding_rules=[("classifier/bias", ("fsdp", None))], max_steps=1)
    trainer = jaxtl.Trainer(model, jaxtl.make_plan("full", model.structure), config)
    with pytest.raises(sharding.ShardingError, match="'classifier/bias' gives"):
        trainer.init_state(1)
    with pytest.raises(ValueError, match=r"grad_accum \(--grad-accum\) must be >= 1"):
        jaxtl.TrainConfig(grad_accum=0)
    with pytest.raises(ValueError, match=r"sharding_rules\[0\] is '.\*'"):
        jaxtl.TrainConfig(sharding_rules=[".*"])


def test_scale_options_survive_run_json():
    config = jaxtl.TrainConfig(
        mesh="fsdp=8", sharding_rules=[("a/.*", PartitionSpec("fsdp", None))], grad_accum=2
    )
    again = jaxtl.TrainConfig(**json.loads(json.dumps(config.to_dict())))
    assert again.scale == config.scale
    assert again.scale.sharding_rules == (("a/.*", ("fsdp", None)),)


# --- gradient accumulation ---------------------------------------------------------------------


def test_grad_accum_four_microbatches_of_8_is_one_step_of_32(tmp_path):
    from jaxtl.encoding import encode_splits

    model = jaxtl.load(make_tiny_bert(str(tmp_path / "bert"), dropout=0.0), num_labels=2)
    arrays, _ = encode_splits(model, small_vader(n_train=96, n_val=8, n_test=8))
    results = {}
    for k in (1, 4):
        config = jaxtl.TrainConfig(batch_size=32, learning_rate=1e-3, max_steps=3, grad_accum=k)
        trainer = jaxtl.Trainer(model, jaxtl.make_plan("full", model.structure), config)
        state = trainer.init_state(3)
        step, _ = trainer._steps(state)
        losses = []
        for i in range(3):
            batch = {key: v[32 * i : 32 * (i + 1)] for key, v in arrays["train"].items()}
            state, metrics = step(state, parallel.global_batch(batch, trainer.mesh))
            losses.append(float(metrics["loss"]))
        results[k] = losses, jax.device_get(state.params)
    assert results[1][0][0] != results[1][0][-1]  # it trained
    # Only the order of the float32 sums differs.
    np.testing.assert_allclose(results[4][0], results[1][0], rtol=2e-6)
    for a, b in zip(jax.tree.leaves(results[4][1]), jax.tree.leaves(results[1][1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# --- 8 CPU devices --------------------------------------------------------------------------------


def _runs(family, model_dir, devices, *runs, steps=4) -> list[dict]:
    """``_sharded_run.py``'s fine-tunes, each ``(mesh, out, *options)``, one after another in
    one process of ``devices`` CPU devices (jax's start-up paid once): what each printed, with
    its final params read from its ``params.npz``."""
    argv = []
    for mesh, out, *extra in runs:
        argv += ["::"] if argv else []
        argv += [family, model_dir, str(devices), mesh, str(steps), str(out), *extra]
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "_sharded_run.py"), *argv],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    printed = [line for line in proc.stdout.splitlines() if line.startswith('{"losses"')]
    assert len(printed) == len(runs), proc.stdout[-4000:]
    results = []
    for line, (_, out, *_) in zip(printed, runs, strict=True):
        result = json.loads(line)
        with np.load(os.path.join(out, "params.npz")) as f:
            result["params"] = {k: f[k] for k in f.files}
        results.append(result)
    return results


def _run(family, model_dir, devices, mesh, out, *extra, steps=4) -> dict:
    """One fine-tune of ``_runs`` in a process of its own."""
    return _runs(family, model_dir, devices, (mesh, out, *extra), steps=steps)[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny random checkpoints saved by transformers, sized so that every mesh axis divides."""
    import torch
    import transformers

    base = tmp_path_factory.mktemp("sharded-models")
    torch.manual_seed(0)
    made = {
        "bert": transformers.BertForSequenceClassification(
            transformers.BertConfig(
                vocab_size=128,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
                max_position_embeddings=32,
                num_labels=3,
            )
        ),
        "gpt2": transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                vocab_size=128,
                n_embd=64,
                n_layer=2,
                n_head=4,
                n_positions=32,
                bos_token_id=None,
                eos_token_id=None,
            )
        ),
        "llama": transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                vocab_size=128,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=128,
                max_position_embeddings=32,
                tie_word_embeddings=False,
                bos_token_id=None,
                eos_token_id=None,
                pad_token_id=None,
            )
        ),
        "vit": transformers.ViTForImageClassification(
            transformers.ViTConfig(
                image_size=32,
                patch_size=8,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
                num_labels=3,
                hidden_dropout_prob=0.1,
            )
        ),
    }
    # Dropout masks are drawn per microbatch, so accumulation is compared without dropout.
    made["bert_nodrop"] = transformers.BertForSequenceClassification(
        transformers.BertConfig.from_dict(
            {**made["bert"].config.to_dict(), "hidden_dropout_prob": 0.0},
            attention_probs_dropout_prob=0.0,
        )
    )
    for name, model in made.items():
        model.save_pretrained(base / name)
    return {name: str(base / name) for name in made}


MIN = 512  # _sharded_run.py's min_shard_size


def _check_held(run: dict, expected) -> None:
    """Every leaf's largest per-device shard is what the mesh should give it, from the devices'
    own shards; optimizer moments hold the same share as their params."""
    for path, held in run["params_held"].items():
        want = expected(path, run["sizes"][path])
        assert held == pytest.approx(want), (path, held, want, run["specs"][path])
    moments = {p: h for p, h in run["opt_held"].items() if "/mu/" in p or "/nu/" in p}
    assert len(moments) == 2 * len(run["params_held"])
    for path, held in moments.items():
        param = path.split("/mu/" if "/mu/" in path else "/nu/")[1]
        assert held == run["params_held"][param], path


def _megatron(path: str) -> str | None:
    layer = path.rsplit("/", 1)[0]
    for pattern, role in (
        (r".*/(query|key|value|c_attn|c_fc|q_proj|k_proj|v_proj|gate_proj|up_proj)", "column"),
        (r".*layer_\d+/intermediate/dense", "column"),
        (r".*(attention/output/dense|attn/c_proj|mlp/c_proj|o_proj|down_proj)", "row"),
        (r".*layer_\d+/output/dense", "row"),
    ):
        if re.fullmatch(pattern, layer):
            return role
    return None


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "vit"])
def test_fsdp_and_3d_meshes_train_like_the_replicated_run(family, models, tmp_path):
    # AdamW divides each gradient by its own RMS, so where a gradient is near zero (ViT's key
    # biases get exactly zero: softmax ignores them) the float32 rounding of the sharded sums
    # becomes an update of up to the learning rate, and params agree only to chance: a
    # one-element miss of 1.3e-5 on ViT's patch kernel after 4 steps at lr 1e-3, with every key
    # bias 1.6-3.7e-6 off. eps = 1e-3 keeps those tiny gradients in AdamW's linear range
    # (update ~ lr * g / eps), where rounding stays rounding; larger gradients are still
    # normalized, and the moments are still sharded and compared below.
    eps = ("--adam-eps", "1e-3")
    # The sharded runs load the model straight onto their mesh (jaxtl.load(mesh=...)).
    on_mesh = (*eps, "--load-on-mesh")
    ref, fsdp, cube = _runs(
        family,
        models[family],
        8,
        ("-", tmp_path / "replicated", *eps),
        ("fsdp=8", tmp_path / "fsdp", "--export", *on_mesh),
        ("data=2,fsdp=2,tensor=2", tmp_path / "cube", *on_mesh),
    )
    assert len(ref["losses"]) == 4 and ref["losses"][0] != ref["losses"][-1]
    for run in (fsdp, cube):
        # Only the reduction order differs (partial sums per device): float32 rounding.
        np.testing.assert_allclose(run["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
        for path, value in ref["params"].items():
            np.testing.assert_allclose(run["params"][path], value, rtol=1e-4, atol=1e-5)

    # jaxtl.export from the sharded run writes the fine-tuned params, read back by jaxtl.load.
    task = {"gpt2": {"task": "causal_lm"}, "llama": {"task": "causal_lm"}}.get(
        family, {"num_labels": 3}
    )
    exported = flatten(jaxtl.load(str(tmp_path / "fsdp" / "export"), **task).params)
    assert exported.keys() == fsdp["params"].keys()
    for path, value in fsdp["params"].items():
        np.testing.assert_array_equal(np.asarray(exported[path]), value, err_msg=path)

    _check_held(ref, lambda path, size: 1.0)
    _check_held(fsdp, lambda path, size: 1 / 8 if size >= MIN else 1.0)
    # Loaded onto the mesh, each param already has the sharding of its train state.
    for run in (fsdp, cube):
        assert run["loaded_as_state"] and all(run["loaded_as_state"].values())
        assert run["loaded_held"] == run["params_held"]

    def cube_share(path, size):
        role, leaf = _megatron(path), path.rsplit("/", 1)[1]
        if role is not None and leaf == "kernel":
            return 1 / 4  # tensor x fsdp
        if role == "column" and leaf == "bias":
            return 1 / 2  # tensor
        return 1 / 2 if size >= MIN else 1.0  # the FSDP rule

    _check_held(cube, cube_share)
    # Most of the model is in sharded leaves: each device holds about 1/8 of the whole.
    total = sum(ref["sizes"].values())
    held = sum(fsdp["params_held"][p] * n for p, n in fsdp["sizes"].items())
    assert held / total < 0.2


@pytest.mark.slow
def test_lora_on_a_3d_mesh_trains_like_replicated_with_adapters_split_like_their_kernels(
    models, tmp_path
):
    lora = ("--recipe", "lora(4)")
    ref, cube = _runs(
        "bert",
        models["bert"],
        8,
        ("-", tmp_path / "replicated", *lora),
        ("data=2,fsdp=2,tensor=2", tmp_path / "cube", *lora),
    )
    assert ref["losses"][0] != ref["losses"][-1]
    np.testing.assert_allclose(cube["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
    for path, value in ref["params"].items():
        np.testing.assert_allclose(cube["params"][path], value, rtol=1e-4, atol=1e-5)
    adapters = {p: h for p, h in cube["params_held"].items() if "/lora_" in p}
    assert len(adapters) == 2 * 2 * 2  # lora_a, lora_b on query and value of 2 layers
    for path, held in adapters.items():
        # query/value are column-parallel, P(fsdp, tensor): lora_a (in, r) is split over
        # fsdp like the kernel's input dim, lora_b (r, out) over tensor like its output dim.
        assert cube["specs"][path] == ("P('fsdp', None)" if path.endswith("lora_a")
                                       else "P(None, 'tensor')"), path  # fmt: skip
        assert held == 0.5, path
    # The frozen base holds no optimizer state; the adapters' moments are split like them.
    moments = {p for p in cube["opt_held"] if "/mu/" in p}
    assert moments and all("/lora_" in p or p.split("/mu/")[1].startswith("classifier")
                           for p in moments)  # fmt: skip


@pytest.mark.slow
def test_grad_accum_under_fsdp_matches_the_replicated_whole_batch(models, tmp_path):
    bert = models["bert_nodrop"]
    ref, accum = _runs(
        "bert",
        bert,
        8,
        ("-", tmp_path / "ref", "--batch", "32"),
        ("fsdp=8", tmp_path / "acc", "--batch", "32", "--grad-accum", "4"),
    )
    np.testing.assert_allclose(accum["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
    for path, value in ref["params"].items():
        np.testing.assert_allclose(accum["params"][path], value, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_checkpoint_saved_on_fsdp8_resumes_on_other_meshes_and_device_counts(models, tmp_path):
    bert = models["bert"]
    # eps as in the runs above (whose compiled fsdp=8 and replicated steps these then reuse).
    eps = ("--adam-eps", "1e-3")
    whole, _ = _runs(
        "bert",
        bert,
        8,
        ("fsdp=8", tmp_path / "whole", *eps),
        ("fsdp=8", tmp_path / "stopped", "--stop-at", "2", *eps),
    )
    resumed = {}
    for name, devices, mesh in (
        ("same", 8, "fsdp=8"),
        ("data8", 8, "data=8"),
        ("fsdp4", 4, "fsdp=4"),
        ("one", 1, "-"),
    ):
        out = tmp_path / name
        shutil.copytree(tmp_path / "stopped", out)
        # Each resume in a new process, as after a restart.
        resumed[name] = _run("bert", bert, devices, mesh, out, "--resume", *eps)
    # The same mesh continues bit for bit: the same math on the same machine.
    assert resumed["same"]["losses"] == whole["losses"]
    for k, v in whole["params"].items():
        np.testing.assert_array_equal(resumed["same"]["params"][k], v)
    # Other meshes restore the same state; only the float32 reduction order of later steps differs.
    for name in ("data8", "fsdp4", "one"):
        run = resumed[name]
        assert run["steps"] == 4 and len(run["losses"]) == 4
        assert run["losses"][:2] == whole["losses"][:2]  # the metrics log kept steps 1-2
        np.testing.assert_allclose(run["losses"], whole["losses"], rtol=1e-5, atol=1e-6)
        for k, v in whole["params"].items():
            np.testing.assert_allclose(run["params"][k], v, rtol=1e-4, atol=1e-5)
    assert resumed["fsdp4"]["params_held"]["bert/embeddings/word_embeddings/embedding"] == 0.25


def test_the_plan_table_shows_what_one_device_holds():
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, np.float32), BERT_LIKE)
    sizes = {"data": 1, "fsdp": 8, "tensor": 1}
    pieces = sharding.piece_counter(params, sizes, structure=_structure())
    plan = jaxtl.make_plan("linear_probe", _structure())
    rows = {r.group: r for r in plan.summary(params, pieces=pieces)}
    frozen, head = rows["frozen"], rows["head"]
    # The frozen body's large leaves split 8 ways (its LayerNorm and biases stay whole)...
    small = (768 + 768 + 768) * 4
    assert frozen.param_bytes_per_device == (frozen.param_bytes - small) // 8 + small
    # ... it has no optimizer state, and the small head's state stays whole.
    assert not frozen.opt_state_bytes and head.opt_state_bytes_per_device == head.opt_state_bytes
    table = plan.table(params, pieces=pieces)
    assert "params/device" in table and "per device: params " in table


def test_batchnorm_under_grad_accum_normalizes_per_microbatch_and_averages_the_updates(tmp_path):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"
    )
    transformers.ResNetModel(config).save_pretrained(tmp_path / "resnet")
    model = jaxtl.load(str(tmp_path / "resnet"), num_labels=3)
    rng = np.random.default_rng(0)
    batch = {
        "pixel_values": (2.0 * rng.standard_normal((8, 16, 16, 3)) + 1.0).astype(np.float32),
        "label": rng.integers(0, 3, 8).astype(np.int32),
    }
    train = jaxtl.TrainConfig(batch_size=8, max_steps=1, grad_accum=2)
    trainer = jaxtl.Trainer(model, jaxtl.make_plan("last_n(1)", model.structure), train)
    state = trainer.init_state(1)
    assert state.bn_train and len(state.bn_train) < len(flatten(model.batch_stats)) // 2
    old = flatten(jax.device_get(state.batch_stats))
    step, _ = trainer._steps(state)
    new, _ = step(state, parallel.global_batch(batch, trainer.mesh))
    new = flatten(jax.device_get(new.batch_stats))
    # What each microbatch (rows 0, 2, 4, 6 and 1, 3, 5, 7) alone makes of the statistics.
    changes = []
    for i in range(2):
        micro = {k: v[i::2] for k, v in batch.items()}
        _, stats = model.forward(
            model.params,
            model.batch_stats,
            micro,
            train=True,
            rng=jax.random.PRNGKey(0),
            bn_train=state.bn_train,
        )
        changes.append({p: v - old[p] for p, v in flatten(jax.device_get(stats)).items()})
    trained = [p for p in old if p.rsplit("/", 1)[0] in state.bn_train]
    assert trained
    for path in old:
        if path in trained:
            expected = old[path] + (changes[0][path] + changes[1][path]) / 2
            np.testing.assert_allclose(new[path], expected, rtol=1e-6, atol=1e-7, err_msg=path)
            assert not np.array_equal(new[path], old[path]), path
        else:  # frozen BatchNorm: its running statistics, bit for bit
            np.testing.assert_array_equal(new[path], old[path], err_msg=path)


def test_a_run_trained_on_another_mesh_is_rescored_on_this_machines_devices(tmp_path):
    """``jaxtl evaluate`` on a run whose run.json records ``fsdp=8`` and ``grad_accum=4``: this
    machine has fewer devices, and evaluation uses them (a checkpoint restores onto any mesh)."""
    from jaxtl import cli
    from jaxtl.run import evaluate_run

    model_dir = make_tiny_bert(str(tmp_path / "bert"))
    argv = ["finetune", "--model", model_dir, "--no-scratch", "--max-steps", "2"]
    assert cli.main([*argv, "--out", str(tmp_path / "out")]) == 0
    run_dir = tmp_path / "out" / "pretrained-full"
    with open(run_dir / "run.json") as f:
        info = json.load(f)
    assert jax.device_count() < 8
    info["config"].update(mesh="fsdp=8", grad_accum=4)
    with open(run_dir / "run.json", "w") as f:
        json.dump(info, f)
    with open(run_dir / "results.json") as f:
        reported = json.load(f)["test"]
    rescored = evaluate_run(str(run_dir), which="latest")["test"]
    assert rescored["examples"] == reported["examples"]
    assert rescored["loss"] == pytest.approx(reported["loss"], rel=1e-5)


# --- loading straight onto a mesh -------------------------------------------------------------

TRANSFER = re.compile(
    r"host-to-device transfer: aval=ShapedArray\((\w+)\[([\d,]*)\]\), dst_sharding=(\w+)"
)


def _transfers(stderr: str, name: str) -> list[tuple[tuple[int, ...], str]]:
    """``(shape, destination sharding class)`` of each host-to-device transfer JAX logged
    between ``_sharded_load.py``'s markers for the load ``name``."""
    part = stderr.split(f"== BEGIN {name}\n")[1].split(f"== END {name}\n")[0]
    return [
        (tuple(int(d) for d in shape.split(",") if d), where)
        for _, shape, where in TRANSFER.findall(part)
    ]


@pytest.fixture(scope="module")
def loaded_on_mesh(tmp_path_factory):
    """``_sharded_load.py``'s comparison of loads onto ``fsdp=8`` and onto the default device
    (a tiny BERT saved by transformers, and a tiny BatchNorm ResNet), with its stderr."""
    import torch
    import transformers

    base = tmp_path_factory.mktemp("load-on-mesh")
    bert = make_tiny_bert(str(base / "bert"), layers=1)
    torch.manual_seed(0)
    resnet = transformers.ResNetModel(
        transformers.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"
        )
    )
    resnet.save_pretrained(base / "resnet")
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "_sharded_load.py"), bert, str(base / "resnet")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0"},  # JAX's C++ log lines are on
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_a_model_loaded_onto_a_mesh_is_split_there_with_the_values_of_a_plain_load(
    loaded_on_mesh,
):
    """``jaxtl.load(mesh="fsdp=8")``: every leaf of at least ``min_shard_size`` elements is
    split 8 ways, read from each device's own shards; the values (pretrained, from scratch,
    and BatchNorm statistics, which are replicated) are bit for bit those of a plain load, and
    the model runs."""
    summary, _ = loaded_on_mesh
    for name in ("bert", "scratch", "resnet", "resnet_stats"):
        run = summary[name]
        assert run["equal"] and run["dtypes_equal"], name
        assert run["devices"] == [8], name  # every leaf lives on the whole mesh
        for path, held in run["held"].items():
            assert held == (1 / 8 if run["split"][path] else 1.0), (name, path, run["specs"])
        assert name != "resnet_stats" or not any(run["split"].values())  # replicated
    for name in ("bert", "scratch", "resnet"):  # the FSDP rule's threshold: 256 elements
        held, sizes = summary[name]["held"], summary[name]["sizes"]
        assert all(held[p] == 1.0 for p, n in sizes.items() if n < 256)
        assert sum(held[p] * n for p, n in sizes.items()) / sum(sizes.values()) < 0.2
    assert summary["bert"]["held"]["bert/embeddings/word_embeddings/embedding"] == 1 / 8
    assert (
        "placed on   mesh data=1,fsdp=8,tensor=1: one device holds 0.5 MiB of the 3.8 MiB"
        in (summary["report"])
    )
    assert "placed on" not in summary["report_default"]
    placed, default = summary["logits"]
    np.testing.assert_allclose(placed, default, rtol=1e-5, atol=1e-7)


def test_loading_onto_a_mesh_never_puts_a_whole_split_param_on_one_device(loaded_on_mesh):
    """From JAX's own transfer log: loaded onto the mesh, nothing as large as a split param
    goes to a single device (only the new head's small kernel is drawn on the host's device,
    then replicated); a plain load puts each param whole on the first device, which is what
    this check would catch."""
    summary, stderr = loaded_on_mesh
    sizes = summary["bert"]["sizes"]
    split = [p for p, on in summary["bert"]["split"].items() if on]
    assert len(split) >= 8
    smallest = min(sizes[p] for p in split)
    on_mesh, plain = _transfers(stderr, "mesh"), _transfers(stderr, "default")
    to_one = [shape for shape, where in on_mesh if where == "SingleDeviceSharding"]
    assert all(math.prod(shape) < smallest for shape in to_one), (to_one, smallest)
    assert sum(where == "NamedSharding" for _, where in on_mesh) >= len(sizes)
    plain_to_one = [shape for shape, where in plain if where == "SingleDeviceSharding"]
    assert (30522, 32) in plain_to_one  # the word embedding, whole on device 0
    shapes = summary["bert"]["shapes"]
    assert all(tuple(shapes[p]) in plain_to_one for p in split)


def test_load_onto_a_mesh_refuses_bad_input_before_reading_weights(tmp_path):
    """A mesh that does not fit the devices, rules without a mesh, and a rule that names an
    unknown axis are errors in the user's terms; the rule is refused before the (here
    corrupt) weights file is read."""
    model_dir = make_tiny_bert(str(tmp_path / "bert"), layers=1)
    n = jax.device_count() + 1
    with pytest.raises(ValueError, match=rf"mesh \(--mesh\) fsdp={n} needs a multiple of {n}"):
        jaxtl.load(model_dir, num_labels=2, mesh=f"fsdp={n}")
    with pytest.raises(ValueError, match=r"no mesh was given: pass mesh= \(--mesh\)"):
        jaxtl.load(model_dir, num_labels=2, sharding_rules=[(".*", "fsdp")])
    with pytest.raises(ValueError, match=r"min_shard_size say how .* no mesh was given"):
        jaxtl.load(model_dir, num_labels=2, min_shard_size=256)
    other = jax.make_mesh((jax.device_count(),), ("batch",))
    with pytest.raises(ValueError, match=r"mesh= has axes \('batch',\).*make_mesh"):
        jaxtl.load(model_dir, num_labels=2, mesh=other)
    with pytest.raises(TypeError, match="give a jax.sharding.Mesh, axis sizes"):
        jaxtl.load(model_dir, num_labels=2, mesh=8)
    with open(os.path.join(model_dir, "model.safetensors"), "r+b") as f:
        f.truncate(16)  # a header that promises more than the file holds
    with pytest.raises(ValueError, match="safetensors"):  # read when the rules are fine
        jaxtl.load(model_dir, num_labels=2, mesh="data=1")
    bad = [(".*/kernel", ("model", None))]
    with pytest.raises(sharding.ShardingError, match="names mesh axis 'model'"):
        jaxtl.load(model_dir, num_labels=2, mesh="data=1", sharding_rules=bad)


@pytest.mark.slow
def test_the_cli_loads_the_model_onto_a_mesh_that_splits_params(tmp_path):
    """``jaxtl finetune --mesh fsdp=8`` on 8 devices loads the model straight onto the mesh
    (the load report says how much one device holds) and trains every arm from it: full,
    LoRA (adapters added to the split base) and scratch; ``jaxtl evaluate``'s restore puts
    the run back on that mesh, split. With --feature-cache, whose features
    come from the whole model, it loads onto one device as before."""
    model_dir = make_tiny_bert(str(tmp_path / "bert"), layers=1)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    base = [sys.executable, "-m", "jaxtl.cli", "finetune", "--model", model_dir]
    base += ["--mesh", "fsdp=8", "--max-steps", "2", "--batch-size", "16"]

    def run(out, *flags):
        proc = subprocess.run(
            [*base, "--out", str(tmp_path / out), *flags],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        with open(tmp_path / out / "summary.json") as f:
            return proc.stdout, json.load(f)

    # A rule that splits a leaf the FSDP rule keeps whole (4,096 < min_shard_size elements).
    rule = ("--shard-rule", ".*/intermediate/dense/kernel=fsdp,none")
    out, summary = run("split", "--recipe", "full,lora(4)", *rule)
    assert out.count("placed on   mesh data=1,fsdp=8,tensor=1: one device holds") == 1
    runs = {r["name"]: r for r in summary["results"]}
    assert set(runs) == {"pretrained full", "pretrained lora(4)", "scratch full"}
    assert all(r["steps"] == 2 for r in runs.values())
    # Re-scored on these 8 devices, the run is restored onto its own mesh, model and state
    # split there, with the test metrics it reported.
    rescore = (
        "import json, sys\n"
        "from jaxtl.run import evaluate_run, restore_run\n"
        "run = restore_run(sys.argv[1])\n"
        "from jaxtl.transfer.trees import flatten\n"
        "held = lambda t: {k: max(s.data.size for s in x.addressable_shards) / x.size\n"
        "    for k, x in flatten(t).items()}\n"
        "print(json.dumps({'model': held(run.model.params), 'state': held(run.state.params),\n"
        "    'mesh': dict(run.trainer.mesh.shape), 'test': evaluate_run(sys.argv[1])['test']}))\n"
    )
    run_dir = next(
        p for p in (tmp_path / "split").iterdir() if p.name.startswith("pretrained-full")
    )
    proc = subprocess.run(
        [sys.executable, "-c", rescore, str(run_dir)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rescored = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rescored["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert rescored["model"] == rescored["state"]  # built where the state lives
    assert rescored["model"]["bert/embeddings/word_embeddings/embedding"] == 1 / 8  # FSDP rule
    assert rescored["model"]["bert/encoder/layer_0/intermediate/dense/kernel"] == 1 / 8  # rule
    assert rescored["model"]["bert/encoder/layer_0/attention/self/query/kernel"] == 1.0
    with open(run_dir / "results.json") as f:
        reported = json.load(f)["test"]
    assert rescored["test"]["examples"] == reported["examples"]
    assert rescored["test"]["loss"] == pytest.approx(reported["loss"], rel=1e-5)
    out, _ = run("cached", "--recipe", "linear_probe", "--no-scratch", "--feature-cache", "memory")
    assert "placed on" not in out


def test_new_leaves_of_a_load_onto_a_mesh_are_drawn_on_the_host(tmp_path, monkeypatch):
    """Loaded onto a mesh, each param that is initialized rather than read (the new head; every
    param from scratch) is drawn under the host-device context (``_on_host``), then split; a
    plain load draws on the default device. On this CPU-only machine the host device is also
    a mesh device, so the context is observed directly."""
    import contextlib

    from jaxtl.weights import loading

    model_dir = make_tiny_bert(str(tmp_path / "bert"), layers=1)
    entered = []
    real = loading._on_host

    @contextlib.contextmanager
    def recording():
        with real():
            entered.append(jax.config.jax_default_device)
            yield

    monkeypatch.setattr(loading, "_on_host", recording)
    model = jaxtl.load(model_dir, num_labels=2, mesh="data=1")
    assert len(entered) == len(model.report.initialized) == 2  # classifier kernel and bias
    assert all(d.platform == "cpu" for d in entered)
    entered.clear()
    scratch = jaxtl.load(model_dir, num_labels=2, mesh="data=1", pretrained=False)
    assert len(entered) == len(flatten(scratch.params))
    entered.clear()
    jaxtl.load(model_dir, num_labels=2)
    assert entered == []
