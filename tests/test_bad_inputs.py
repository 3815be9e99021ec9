"""Every binary's bad input, table-driven: each case must exit 2 with one `error: ...` line
on stderr that names the flag (or the install script), and write nothing at all.

The kinds of bad input (the reliability issue's list): out of range, malformed, NaN/inf,
huge, repeated, inconsistent across flags, bad paths, missing or corrupt data. A table's
cases run in one process (tests/bad_input_driver.py: the binary's own entry point, flags
parsed afresh per case); `test_the_real_entry_point_refuses_the_same_way` runs each
binary's first case through `python -m` as a user would.

Placeholders in a case: {tmp} is the table's scratch folder, holding `a_file` (a plain
file), `not_a_model.gguf` (text) and `corrupt_fashion/` (idx files of garbage). Each
case gets its own --workdir, `{tmp}/case<i>/runs`; "nothing written" means `{tmp}/case<i>`
does not exist afterwards. The embeddings cases share one embedding cache, outside it.
"""

import json
import os
import subprocess
import sys

import pytest
from binaries import ROOT, assert_refused, subprocess_env

BIG = "99999999999999999999"  # beyond int64

FPE_TRAINING = [  # the training flags every FPE binary shares (fpe_sweep), base-relative
    (["--alphas=2,2"], "--alphas"),
    (["--alphas=1"], "--alphas"),
    (["--alphas=two"], "--alphas"),
    (["--learning_rate=inf"], "--learning_rate"),
    (["--learning_rate=nan"], "--learning_rate"),
    (["--learning_rate=0"], "--learning_rate"),
    (["--weight_decay=-1"], "--weight_decay"),
    (["--seed=-1"], "--seed"),
    (["--seed=" + BIG], "--seed"),
    (["--seeds=0"], "--seeds"),
    (["--batch_size=0"], "--batch_size"),
    (["--chunk_steps=0"], "--chunk_steps"),
    (["--schedule=step"], "--schedule_boundaries"),
    (["--schedule_decay=nan"], "--schedule_decay"),
    (["--matmul=triton"], "--matmul"),
    (["--run_name=../escape"], "--run_name"),
    (["--workdir={tmp}/a_file"], "--workdir"),
    (["--flagfile={tmp}/no_such.flags"], "no_such.flags"),
]

SWEEP = [  # the width/arm sweep of deep and embeddings
    (["--arms=dense,magic"], "--arms"),
    (["--arms=dense,dense"], "--arms"),
    (["--widths=4,4"], "--widths"),
    (["--dense_ratios=inf"], "--dense_ratios"),
    (["--dense_ratios=0.5"], "--dense_ratios"),
    (["--dense_ratios=2,2.0"], "--dense_ratios"),  # one value, two spellings
]

TABLES = {
    "experiments.boolean": (
        ["--d=12", "--k=3", "--clauses=3", "--neurons=4", "--alphas=2",
         "--splits=dense,random,clause", "--seeds=2", "--train_size=256", "--test_size=256",
         "--batch_size=32", "--warmup_steps=100", "--steps=1200", "--chunk_steps=100"],
        FPE_TRAINING + [
            (["--splits=dense,bogus"], "--splits"),
            (["--splits=dense,random,random"], "--splits"),
            (["--layer=3"], "--layer"),
            (["--d=8", "--k=9"], "--k"),
            (["--k=0"], "--k"),
            (["--depth=0"], "--depth"),
            (["--steps=1050"], "--steps"),
            (["--warmup_steps=150"], "--warmup_steps"),
            (["--train_size=1"], "--train_size"),
            (["--test_size=0"], "--test_size"),
            (["--batch_size=1000"], "--batch_size"),  # more than the 256 training examples
            (["--clauses=3,x"], "--clauses"),
            (["--clauses=3,3"], "--clauses"),
            (["--clauses=100000"], "--clauses"),  # more than the distinct 3-clauses of 12 vars
            (["--neurons=4,4"], "--neurons"),
            (["--alphas=16"], "--alphas"),  # more children than the 12 inputs of a neuron
        ]),
    "experiments.deep": (
        ["--tasks=mlp,cnn", "--depth=2", "--cnn_channels=2", "--train_size=512",
         "--widths=4", "--alphas=2", "--arms=dense,random", "--dense_ratios=", "--seeds=1",
         "--warmup_steps=10", "--steps=10", "--chunk_steps=10", "--batch_size=16"],
        FPE_TRAINING + SWEEP + [
            (["--widths=2", "--alphas=4"], "--widths"),
            (["--tasks=resnet"], "--tasks"),
            (["--tasks=mlp,mlp"], "--tasks"),
            (["--warmup_steps=15"], "--warmup_steps"),  # neither below 10 nor a multiple
            (["--steps=15"], "--steps"),
            (["--depth=0"], "--depth"),
            (["--cnn_channels=0"], "--cnn_channels"),
            (["--train_size=-1"], "--train_size"),
            (["--train_size=5"], "--train_size"),  # cannot hold the 10 classes
            (["--train_size=70000"], "--train_size"),  # more than the 60,000 images
            (["--data_dir=/nonexistent/fashion"], "--data_dir"),
            (["--data_dir={tmp}/a_file"], "--data_dir"),
            (["--data_dir={tmp}/corrupt_fashion"], "install_data.sh"),  # and names --data_dir
        ]),
    "experiments.embeddings": (
        ["--tasks=sentiment", "--max_rows=240", "--widths=4", "--alphas=2",
         "--arms=dense,random,dropconnect", "--dense_ratios=2", "--seeds=2",
         "--warmup_steps=10", "--steps=20", "--chunk_steps=20", "--batch_size=16",
         "--cache_dir={tmp}/cache"],  # shared: computed once, reused by later cases
        FPE_TRAINING + SWEEP + [
            (["--widths=1", "--alphas=2"], "--widths"),
            (["--tasks=genre"], "--tasks"),
            (["--tasks=sentiment,sentiment"], "--tasks"),
            (["--warmup_steps=30"], "--warmup_steps"),  # neither below 20 nor a multiple
            (["--depth=0"], "--depth"),
            (["--batch_size=1000"], "--batch_size"),  # more than the training examples
            (["--test_fraction=0"], "--test_fraction"),
            (["--test_fraction=1"], "--test_fraction"),
            (["--test_fraction=nan"], "--test_fraction"),
            (["--data_seed=-1"], "--data_seed"),
            (["--max_rows=-1"], "--max_rows"),
            (["--max_rows=3"], "--max_rows"),  # too few reviews for train and test of a class
            (["--embed_batch=0"], "--embed_batch"),
            (["--cache_dir={tmp}/a_file"], "--cache_dir"),
        ]),
    "experiments.ncen": (
        ["--dataset=mnist5k", "--width=2", "--hidden=8", "--num_members=2",
         "--methods=ncen", "--batch_size=16", "--train_steps=4", "--chunk_steps=2",
         "--eps=0.3", "--large_eps=1.0", "--n_eval=20", "--eval_batch_size=20",
         "--clean_eval_size=100", "--targets=ensemble", "--attack_losses=ce",
         "--attacks=pgd,fgsm", "--pgd_steps=3", "--pgd_restarts=1", "--steps_check=1",
         "--run_name=tiny"],
        [
            (["--eps=0.1,-0.05"], "--eps"),
            (["--eps=nan"], "--eps"),
            (["--eps=0.3,0.3"], "--eps"),
            (["--large_eps=-1"], "--large_eps"),
            (["--large_eps_threshold=2"], "--large_eps_threshold"),
            (["--methods=ncen,dverge"], "--methods"),
            (["--methods=ncen,ncen"], "--methods"),
            (["--attacks=pgd,cw"], "--attacks"),
            (["--attack_losses=hinge"], "--attack_losses"),
            (["--targets=bogus"], "--targets"),
            (["--num_members=1", "--methods=independent,gal"], "--num_members"),
            (["--num_members=0"], "--num_members"),
            (["--eval_batch_size=7"], "--eval_batch_size"),
            (["--lam_dir=nan"], "--lam_dir"),
            (["--trs_scale=inf"], "--trs_scale"),
            (["--trs_plus_adv=maybe"], "--trs_plus_adv"),
            (["--ncen_smoothness=maybe"], "--ncen_smoothness"),
            (["--trs_adv_eps_start=-0.1"], "--trs_adv_eps_start"),
            (["--trs_adv_eps_end=nan"], "--trs_adv_eps_end"),
            (["--trs_adv_eps_end=inf"], "--trs_adv_eps_end"),
            (["--trs_adv_steps=0"], "--trs_adv_steps"),
            (["--trs_adv_steps=" + BIG], "--trs_adv_steps"),
            (["--learning_rate=inf"], "--learning_rate"),
            (["--learning_rate=-1"], "--learning_rate"),
            (["--optimizer=lion"], "--optimizer"),
            (["--weight_decay=-1e-4"], "--weight_decay"),
            (["--schedule=step"], "--schedule_boundaries"),  # no boundaries
            (["--schedule_boundaries=2"], "--schedule_boundaries"),  # without --schedule=step
            (["--schedule=step", "--schedule_boundaries=4"], "--schedule_boundaries"),  # >= 4
            (["--schedule=step", "--schedule_boundaries=3,1"], "--schedule_boundaries"),
            (["--schedule_decay=0"], "--schedule_decay"),
            (["--member_devices=2"], "--member_devices"),  # one device
            (["--data_devices=3"], "--data_devices"),
            (["--clean_eval_size=0", "--n_eval=2000"], "--n_eval"),  # > the 1,000 test images
            (["--clean_eval_size=5000"], "--clean_eval_size"),
            (["--n_eval=200"], "--n_eval"),  # more than the 100 clean images it is drawn from
            (["--train_size=5"], "--train_size"),  # cannot hold the 10 classes
            (["--train_size=100000"], "--train_size"),
            (["--seed=-1"], "--seed"),
            (["--seed=" + BIG], "--seed"),
            (["--pgd_steps=0"], "--pgd_steps"),
            (["--pgd_restarts=0"], "--pgd_restarts"),
            (["--step_fraction=0"], "--step_fraction"),
            (["--step_fraction=inf"], "--step_fraction"),
            (["--step_fraction=nan"], "--step_fraction"),
            (["--pgd_schedule=cosine"], "--pgd_schedule"),
            (["--masking_check_tolerance=-0.01"], "--masking_check_tolerance"),
            (["--masking_check_tolerance=nan"], "--masking_check_tolerance"),
            (["--masking_check_tolerance=1.5"], "--masking_check_tolerance"),
            (["--mim_decay=nan"], "--mim_decay"),
            (["--check_tolerance=-1"], "--check_tolerance"),
            (["--steps_check=5"], "--steps_check"),  # not fewer than --pgd_steps=3
            (["--steps_check=1,1"], "--steps_check"),
            (["--width=0"], "--width"),
            (["--batch_size=0"], "--batch_size"),
            (["--chunk_steps=3"], "--chunk_steps"),  # does not divide --train_steps=4
            (["--dataset=cifar"], "--dataset"),
            (["--run_name=a/b"], "--run_name"),
            (["--workdir={tmp}/a_file"], "--workdir"),
        ]),
}

LLM_BASE = ["--layers=0", "--calib_windows=2", "--calib_window=32", "--eval_windows=1",
            "--eval_window=32", "--kmeans_restarts=1", "--kmeans_iters=2"]
LLM_SETUP = [  # the model and calibration flags both SmolLM2 binaries share (llm_setup)
    (["--model_path=/nonexistent/model.gguf"], "--model_path"),
    (["--model_path={tmp}/not_a_model.gguf"], "--model_path"),
    (["--model_path={tmp}"], "--model_path"),
    (["--layers=0,x"], "--layers"),
    (["--layers=-1"], "--layers"),
    (["--layers=0,0"], "--layers"),
    (["--layers=99"], "--layers"),  # SmolLM2-135M has 30 blocks
    (["--calib_window=100000"], "--calib_window"),  # longer than the 8,192-token context
    (["--eval_window=100000"], "--eval_window"),
    (["--calib_windows=0"], "--calib_windows"),
    (["--eval_windows=-1"], "--eval_windows"),
    (["--damp=inf"], "--damp"),
    (["--damp=-1"], "--damp"),
    (["--pca_components=5000"], "--pca_components"),  # above the 576 / 1536 inputs
    (["--seed=-1"], "--seed"),
    (["--seed=" + BIG], "--seed"),
    (["--batch_size=0"], "--batch_size"),
    (["--kmeans_iters=0"], "--kmeans_iters"),
    (["--expert_matmul=triton"], "--expert_matmul"),
    (["--data_devices=0"], "--data_devices"),
    (["--data_devices=3"], "--data_devices"),  # 64 calibration tokens
    (["--data_devices=16"], "--data_devices"),  # more than the host's device
    (["--expert_devices=0"], "--expert_devices"),
    (["--expert_devices=3"], "--expert_devices"),  # does not divide K=2
    (["--run_name=.."], "--run_name"),
    (["--workdir={tmp}/a_file"], "--workdir"),
]
TABLES["experiments.sparse_expansion"] = (
    LLM_BASE + ["--methods=dense,sparse_expansion", "--sparsities=0.5", "--num_experts=2"],
    LLM_SETUP + [
        (["--num_experts=64", "--calib_windows=1", "--calib_window=64"], "--num_experts"),
        (["--num_experts=0"], "--num_experts"),
        (["--num_experts=2,2"], "--num_experts"),
        (["--sparsities=1.2"], "--sparsities"),
        (["--sparsities=nan"], "--sparsities"),
        (["--sparsities=0.5,0.5"], "--sparsities"),
        (["--sparsities=0.5,0.50"], "--sparsities"),  # one value, two spellings
        (["--n_m=4:2"], "--n_m"),
        (["--n_m=0:4"], "--n_m"),
        (["--n_m=2:5"], "--n_m"),  # 5 divides neither 576 nor 1536
        (["--n_m=2:4,2:4"], "--n_m"),
        (["--n_m=2-4"], "--n_m"),
        (["--methods=dense,bogus"], "--methods"),
        (["--methods=dense,dense"], "--methods"),
    ])
TABLES["experiments.wasserstein"] = (
    LLM_BASE + ["--criteria=wasserstein,random", "--num_experts=2"],
    LLM_SETUP + [
        (["--num_experts=64", "--calib_windows=1", "--calib_window=64"], "--num_experts"),
        (["--num_experts=-1"], "--num_experts"),
        (["--criteria=random,random"], "--criteria"),
        (["--criteria=bogus"], "--criteria"),
        (["--neuron_fraction=0"], "--neuron_fraction"),
        (["--neuron_fraction=1.5"], "--neuron_fraction"),
        (["--neuron_fraction=nan"], "--neuron_fraction"),
        (["--sparsity=1"], "--sparsity"),
        (["--sparsity=nan"], "--sparsity"),
        (["--expansion_sparsity=1"], "--expansion_sparsity"),
        (["--method=bogus"], "--method"),
    ])


COMMON = [  # what every binary gets from experiments.common (and absl)
    (["--bogus_flag=1"], "bogus_flag"),
    (["positional"], "unexpected arguments"),
    (["--flagfile={tmp}/no_such.flags"], "no_such.flags"),
]
# The benchmarks write nothing but their output; a case that slipped through would time.
TABLES["experiments.bench_llama"] = (
    ["--windows=1", "--window=8", "--repeats=1"],
    COMMON + [
        (["--windows=0"], "--windows"),
        (["--window=1"], "--window"),
        (["--window=100000"], "--window"),  # longer than Persuasion
        (["--repeats=0"], "--repeats"),
        (["--torch_threads=-1"], "--torch_threads"),
        (["--torch_python={tmp}/no_python"], "--torch_python"),
        (["--torch_python={tmp}/a_file"], "--torch_python"),  # not executable
        (["--windows=x"], "--windows"),
        (["--windows=1000", "--window=512"], "--windows"),  # more than Persuasion holds
        (["--window=" + BIG], "--window"),
        (["--repeats=1.5"], "--repeats"),
        (["--torch_threads=x"], "--torch_threads"),
    ])
TABLES["experiments.bench_boolean"] = (
    ["--seeds=1", "--steps=10", "--repeats=1"],
    COMMON + [
        (["--seeds=0"], "--seeds"),
        (["--steps=0"], "--steps"),
        (["--steps=" + BIG], "--steps"),
        (["--d=1"], "--d"),
        (["--d=x"], "--d"),
        (["--neurons=0"], "--neurons"),
        (["--batch_size=0"], "--batch_size"),
        (["--repeats=0"], "--repeats"),
        (["--seeds=x"], "--seeds"),
        (["--seeds=-1"], "--seeds"),
        (["--neurons=" + BIG], "--neurons"),
        (["--batch_size=1.5"], "--batch_size"),
    ])
TABLES["experiments.bench_ncen"] = (
    ["--iters=1", "--repeats=1", "--width=2", "--hidden=8", "--batch_size=8"],
    COMMON + [
        (["--num_members=1"], "--num_members"),
        (["--width=0"], "--width"),
        (["--hidden=0"], "--hidden"),
        (["--batch_size=0"], "--batch_size"),
        (["--batch_size=100000"], "--batch_size"),  # more than the training images
        (["--iters=0"], "--iters"),
        (["--repeats=0"], "--repeats"),
        (["--architecture=resnet"], "--architecture"),
        (["--num_members=x"], "--num_members"),
        (["--width=" + BIG], "--width"),
        (["--iters=-1"], "--iters"),
        (["--hidden=1.5"], "--hidden"),
    ])
TABLES["experiments.bench_sparsegpt"] = (
    ["--shapes=64x64", "--tokens=64", "--repeats=1", "--block_size=32"],
    COMMON + [
        (["--shapes=64"], "--shapes"),
        (["--shapes=64x64,64x64"], "--shapes"),
        (["--sparsity=1"], "--sparsity"),
        (["--sparsity=nan"], "--sparsity"),
        (["--n_m=2:2"], "--n_m"),
        (["--n_m=2-4"], "--n_m"),
        (["--n_m=3:5"], "--n_m"),  # 5 does not divide d_in = 64
        (["--block_size=0"], "--block_size"),
        (["--tokens=0"], "--tokens"),
        (["--repeats=0"], "--repeats"),
        (["--seed=-1"], "--seed"),
        (["--recon_layers=x"], "--recon_layers"),
        (["--recon_layers=99"], "--recon_layers"),  # SmolLM2-135M has 30 blocks
        (["--recon_layers=0", "--recon_windows=0"], "--recon_windows"),
        (["--recon_layers=0", "--recon_window=100000"], "--recon_window"),
        (["--tokens=" + BIG], "--tokens"),
        (["--torch_python={tmp}/a_file"], "--torch_python"),
        (["--official_sparsegpt={tmp}"], "--official_sparsegpt"),  # no sparsegpt.py there
    ])
for _binary, (_base, _cases) in list(TABLES.items()):
  if not _binary.startswith("experiments.bench"):
    _cases += [case for case in COMMON if case not in _cases]


def _scratch(folder) -> None:
  (folder / "a_file").write_text("a file, not a folder\n")
  (folder / "not_a_model.gguf").write_text("not a GGUF file\n")
  corrupt = folder / "corrupt_fashion"
  corrupt.mkdir()
  for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
    (corrupt / name).write_bytes(b"\x00\x01garbage" * 10)


def _case_args(base, args, tmp, i):
  case = tmp / f"case{i}"
  fill = lambda a: a.format(tmp=tmp, case=case)  # noqa: E731
  return [f"--workdir={case}/runs", *map(fill, base), *map(fill, args)], case


@pytest.fixture(scope="module", params=sorted(TABLES))
def table(request, tmp_path_factory):
  """(binary, scratch folder, [(args, flag, case folder, status, stderr)])."""
  binary = request.param
  base, cases = TABLES[binary]
  tmp = tmp_path_factory.mktemp(binary.split(".")[1])
  _scratch(tmp)
  argvs, folders = zip(*(_case_args(base, args, tmp, i) for i, (args, _) in enumerate(cases)),
                       strict=True)
  (tmp / "cases.json").write_text(json.dumps(argvs))
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tests", "bad_input_driver.py"), binary,
       str(tmp / "cases.json"), str(tmp / "out.json")],
      cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  outcomes = json.loads((tmp / "out.json").read_text())
  return binary, tmp, [(args, flag, folder, o["status"], o["stderr"])
                       for (args, flag), folder, o in zip(cases, folders, outcomes, strict=True)]


def test_every_bad_input_is_refused_on_one_line_naming_its_flag(table):
  binary, _, outcomes = table
  failures = []
  for args, flag, folder, status, stderr in outcomes:
    lines = [line for line in stderr.splitlines() if line.strip()]
    problems = [why for why, bad in [
        (f"exit status {status}, not 2", status != 2),
        (f"{len(lines)} stderr lines, not 1", len(lines) != 1),
        (f"the line does not name {flag}",
         len(lines) == 1 and not (lines[0].startswith("error: ") and flag in lines[0])),
        ("it wrote files", folder.exists()),
    ] if bad]
    if problems:
      failures.append(f"{' '.join(args)}: {'; '.join(problems)}\n    "
                      + "\n    ".join(lines[-3:]))
  print(f"{binary}: {len(outcomes) - len(failures)} of {len(outcomes)} bad inputs refused "
        "cleanly")
  assert len(outcomes) >= 15
  assert not failures, "\n".join(failures)


@pytest.mark.parametrize("binary", sorted(TABLES))
def test_the_real_entry_point_refuses_the_same_way(tmp_path, binary):
  """The table's first case through `python -m`, as a user runs it: app.run, absl's own
  flag parsing and the interpreter's exit."""
  base, cases = TABLES[binary]
  _scratch(tmp_path)
  args, flag = cases[0]
  argv, case = _case_args(base, args, tmp_path, 0)
  proc = subprocess.run([sys.executable, "-m", binary, *argv], cwd=ROOT, env=subprocess_env(),
                        capture_output=True, text=True, timeout=300)
  assert_refused(proc, flag, case)
