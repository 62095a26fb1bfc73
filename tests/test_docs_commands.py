"""Every command the README and docs/*.md show is exercised by a test, and every `hptransfer` command among
them parses with today's command line.

Commands are the lines of fenced (```) and indented code blocks whose first word (after `VAR=value`
assignments) is a program below; `\\` continuations are joined and trailing `# comments` dropped.
- Each must match an entry of :data:`COVERAGE`, whose tests run that command (or, for a launcher that
  cannot run here, the launch it makes: `srun`, `sbatch`, pdsh) at toy size. A command nobody covers fails
  here, so the docs cannot show a command that no test runs; an entry naming a test that does not exist
  fails too.
- Each `hptransfer ...` line is parsed by the real argument parser of its subcommand (optional parts in
  `[...]` dropped, the first of `a|b` alternatives taken, `...` dropped), so a renamed or removed option
  in the docs fails here.
"""
from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PROGRAMS = {"hptransfer", "python", "python3", "deepspeed", "torchrun", "srun", "sbatch", "make", "bash", "pip",
            "nsys", ".venv/bin/python", ".venv/bin/hptransfer"}

# regex (matched against the whole command) -> the tests that run it; "file.py::name" names a test function
COVERAGE: list[tuple[str, list[str]]] = [
    # ---- make and pip (README)
    (r"^make demo$", ["tests/test_demo.py::test_demo_end_to_end",
                      "tests/test_packaging.py::test_make_demo_and_make_test_set_up_then_run_their_command"]),
    (r"^make demo-garment$", ["tests/test_garment.py::test_garment_demo_end_to_end",
                              "tests/test_packaging.py::test_make_demo_and_make_test_set_up_then_run_their_command"]),
    (r"^make test$", ["tests/test_packaging.py::test_make_demo_and_make_test_set_up_then_run_their_command",
                      "tests/test_packaging.py::test_makefile_targets_cuda_12_and_refuses_other_majors"]),  # its setup
    (r"^pip install --no-build-isolation \.$",  # the sdist of `.`, installed the same way (--no-deps --target)
     ["tests/test_packaging.py::test_sdist_is_complete_and_builds_against_the_installed_torch",
      "tests/test_packaging.py::test_isolated_build_says_how_to_build",
      "tests/test_packaging.py::test_installed_metadata_declares_the_dependencies_and_they_are_met"]),
    # ---- data
    (r"^hptransfer data synth --out \S+ --identities \d+ --poses \d+ --size \d+$",
     ["tests/test_synth.py::test_cli_synth_then_check"]),
    (r"^hptransfer data synth --out \S+ (--identities \d+ --poses \d+ --size \d+ )?--views front,three-quarter "
     r"--framing centred$", ["tests/test_synth.py::test_cli_views_and_framing_reach_the_generator"]),
    (r"^hptransfer data check data/\w+$",
     ["tests/test_synth.py::test_cli_synth_then_check",
      "tests/test_own_data.py::test_own_photos_to_a_trained_model_and_its_samples"]),
    (r"^hptransfer data show data/\w+ --n \d+ --out \S+$", ["tests/test_synth.py::test_cli_synth_then_check"]),
    (r"^hptransfer data show data/\w+ --descriptors \d+ --out \S+$",
     ["tests/test_show_descriptors.py::test_data_show_descriptors_command"]),
    (r"^hptransfer data photos --images \S+ --out \S+",  # without --keypoints: MediaPipe
     ["tests/test_own_data.py::test_own_photos_to_a_trained_model_and_its_samples",
      "tests/test_mediapipe.py::test_data_photos_with_mediapipe_keypoints"]),
    (r"^hptransfer data split ", ["tests/test_split.py::test_split_by_person_keeps_people_and_pairs_on_one_side",
                                  "tests/test_split.py::test_person_rules",  # --person-regex / --person-csv rules
                                  "tests/test_own_data.py::test_own_photos_to_a_trained_model_and_its_samples"]),
    (r"^hptransfer data shard \S+ \S+ ",
     ["tests/test_shards.py::test_cli_shard_check_show",  # --sizes, --shard-size, --workers, png, --skip-bad
      "tests/test_shards.py::test_jpeg_members_near_the_folder_and_square_sources_kept"]),  # jpg, --quality
    (r"^hptransfer data check shards/\S+ ", ["tests/test_shards.py::test_cli_shard_check_show",
                                             "tests/test_shards.py::test_damaged_member_names_shard_and_member"]),
    (r"^hptransfer data show shards/\S+ --n \d+ --out \S+$", ["tests/test_shards.py::test_cli_shard_check_show"]),
    (r"^hptransfer data h36m --root \S+ --out \S+ --shards --workers \d+$",
     ["tests/test_prepare.py::test_data_h36m_command_writes_shards_like_its_folder",  # --keypoints gt there
      "tests/test_mediapipe.py::test_data_h36m_merges_mediapipe_eyes_and_ears_with_the_ground_truth"]),  # the default
    # ---- training on one machine
    (r"^hptransfer train --config configs/deepfashion_256\.yaml --out \S+",  # a tiny config; the shipped one loads
     ["tests/test_train.py::test_cli_entry_point", "tests/test_train.py::test_shipped_configs_load",
      "tests/test_config.py::test_overrides"]),
    (r"^python -m hptransfer\.train --config \S+ --out \S+$",  # train.main in process; `-m` on two ranks
     ["tests/test_cluster.py::test_signal_stops_after_the_step_with_checkpoint_and_resume_is_exact",
      "tests/test_multinode.py::test_two_nodes_one_rank_each"]),
    (r"^hptransfer train --config configs/own_data_cpu\.yaml data\.root=\S+ --out \S+$",
     ["tests/test_own_data.py::test_own_photos_to_a_trained_model_and_its_samples"]),
    (r"^hptransfer train --config configs/own_data_cpu\.yaml data\.root=\S+ 'stages=\[",
     ["tests/test_own_data.py::test_own_photos_to_a_trained_model_and_its_samples",
      "tests/test_config.py::test_stages_replaced_whole_by_an_override"]),
    (r"^hptransfer train --config configs/h36m_1024\.yaml data\.root=shards/",  # a tiny config, from shards
     ["tests/test_shards.py::test_training_from_shards_equals_folder_and_resumes_exactly",
      "tests/test_train.py::test_shipped_configs_load"]),
    (r"^hptransfer train --config configs/garment_flow\.yaml --out \S+$",
     ["tests/test_garment.py::test_garment_flow_task_trains_with_the_trainer",
      "tests/test_garment.py::test_garment_flow_task_under_deepspeed_two_ranks"]),  # the CLI, with that config
    (r"^deepspeed --num_gpus \d+ hptransfer/train\.py --config configs/\w+\.yaml .*"
     r"--deepspeed_config configs/ds/zero2_bf16\.json$",  # the launcher with 2 CPU ranks (gloo)
     ["tests/test_garment.py::test_garment_flow_task_under_deepspeed_two_ranks",
      "tests/test_train_deepspeed.py::test_two_ranks_zero123_fp16_growth_checkpoint_resume",
      "tests/test_train.py::test_shipped_configs_load"]),
    (r"^hptransfer doctor ", ["tests/test_gpu_path.py::test_doctor_command",
                              "tests/test_gpu_path.py::test_doctor_strict_fails_on_a_fallback"]),
    (r"^hptransfer weights fetch vgg16$",  # from a local server; vgg16's published hash checked
     ["tests/test_weights.py::test_fetch_verifies_then_moves_into_the_hub_cache",
      "tests/test_weights.py::test_published_hashes_match_their_file_names",
      "tests/test_weights.py::test_vgg_weights_auto_fetches_on_first_use"]),
    # ---- clusters: the launch srun / torchrun makes, on CPU ranks
    (r"^srun \.venv/bin/python -m hptransfer\.train --config \S+ --deepspeed_config configs/ds/zero2_bf16\.json "
     r"--out \S+ --device cuda --resume auto$",
     ["tests/test_cluster.py::test_srun_two_tasks_stats_and_signal",  # SLURM's variables only, SIGTERM, resume
      "tests/test_multinode.py::test_two_nodes_one_rank_each"]),  # this command line with zero2_bf16, on CPU ranks
    (r"^srun --ntasks-per-node=1 \.venv/bin/torchrun --nnodes=\S+ --nproc_per_node=\d+ --rdzv_backend=c10d ",
     ["tests/test_cluster.py::test_torchrun_two_nodes_rendezvous"]),  # two torchrun agents, c10d rendezvous
    (r"^srun nsys profile --capture-range=cudaProfilerApi ",  # nsys itself needs a GPU: the capture window
     ["tests/test_cluster.py::test_capture_window",
      "tests/test_step.py::test_nvtx_off_makes_no_calls_and_on_pushes_named_ranges"]),
    # ---- evaluate, generate, export
    (r"^hptransfer eval --checkpoint \S+ --data \S+ --split test",
     ["tests/test_infer_video.py::test_eval_generates_a_split",
      "tests/test_own_data.py::test_own_photos_to_a_trained_model_and_its_samples"]),
    (r"^hptransfer eval --pred \S+ --gt \S+ --protocol both --crop \d+:\d+$",
     ["tests/test_metrics.py::test_eval_reports_unavailable_instead_of_crashing",  # default protocol both, --crop
      "tests/test_metrics.py::test_eval_pred_gt_reproduces_skimage"]),
    (r"^hptransfer eval --checkpoint \S+ --data \S+ --pose-following$",
     ["tests/test_infer_video.py::test_eval_generates_a_split", "tests/test_demo.py::test_demo_end_to_end"]),
    (r"^hptransfer infer --checkpoint \S+ --reference \S+ --pose \S+\.json --out \S+$",
     ["tests/test_infer_video.py::test_infer_cli_fits_like_training",
      "tests/test_framing.py::test_full_frame_body25_just_works"]),
    (r"^hptransfer infer --checkpoint \S+ --reference \S+ --pose \S+\.json --paste-back \S+ --out \S+$",
     ["tests/test_framing.py::test_paste_back_into_the_wide_frame"]),
    (r"^hptransfer infer --checkpoint \S+ --reference \S+ --pose [^\s:]+\.jpg --out \S+$",  # a photo's pose
     ["tests/test_mediapipe.py::test_infer_with_a_photo_as_pose"]),
    (r"^hptransfer infer --checkpoint \S+ --reference \S+ --pose \S+\.csv:\S+ --out \S+$",
     ["tests/test_own_data.py::test_own_photos_to_a_trained_model_and_its_samples",
      "tests/test_infer_video.py::test_infer_cli_fits_like_training"]),
    (r"^hptransfer video --checkpoint \S+ --reference \S+ --poses \S+/ --out \S+ --fps \d+ --side-by-side$",
     ["tests/test_infer_video.py::test_video_frame_count_and_size"]),
    (r"^hptransfer video --checkpoint \S+ --reference \S+ --poses \S+\.mp4 --out \S+$",
     ["tests/test_mediapipe.py::test_video_driven_by_a_video_of_a_person",
      "tests/test_infer_video.py::test_pose_sequence_from_csv_and_driving_video"]),
    (r"^hptransfer export --checkpoint runs/x/export --format onnx --resolution \d+ --out \S+$",
     ["tests/test_export.py::test_cli_export_formats", "tests/test_export.py::test_onnx_matches_torch"]),
    (r"^hptransfer export --checkpoint runs/flow/export --format onnx --out \S+$",
     ["tests/test_appearance_flow.py::test_flow_onnx_export_matches_onnxruntime"]),
    # ---- experiments and garment transfer
    (r"^hptransfer ablate --base configs/synth_ablation\.yaml --variants \S+ --seeds \d+ --out \S+$",
     ["tests/test_ablate.py::test_ablate_two_variants_two_seeds_killed_and_resumed",
      "tests/test_ablate.py::test_table1_variants_on_the_shipped_base"]),  # every variant named exists
    (r"^hptransfer ablate --out \S+ --report$",
     ["tests/test_ablate.py::test_report_command_reads_the_table_and_refuses_training_options"]),
    (r"^hptransfer ablate --base \S+ --descriptors [\d,]+ ",
     ["tests/test_ablate.py::test_descriptor_sweep_skips_ld_at_zero_and_draws_fig4",  # ablate(descriptors=...)
      "tests/test_ablate.py::test_report_command_reads_the_table_and_refuses_training_options"]),  # its parsing
    (r"^hptransfer compare --gt \S+ (--method \w+=\S+ )+--crop \d+:\d+ ",
     ["tests/test_compare.py::test_compare_reproduces_skimage_ssim_for_every_method",
      "tests/test_compare.py::test_every_method_is_scored_on_the_same_images_and_the_dropped_are_named"]),
    (r"^hptransfer garment --person \S+ --garment \S+ --transfer \S+ --flow \S+ ",
     ["tests/test_garment.py::test_pipeline_with_files_and_transported_region",
      "tests/test_garment.py::test_pipeline_on_synthetic_inputs_writes_result_and_steps"]),  # --steps, --back-to-pose
    (r"^hptransfer garment-study --data \S+ --out \S+ ",  # study() with the command's settings; the CLI's --report
     ["tests/test_garment.py::test_garment_study_curves_seeds_rounds_and_resume"]),
    # ---- benchmarks (bench/gpu_check.sh --dry-run runs the ones without a test of their own, at toy size)
    (r"^python bench/bench_train\.py --resolution \d+ --mode both$",
     ["tests/test_bench.py::test_bench_train_end_to_end_and_plot"]),
    (r"^python bench/bench_kernels\.py( \[--quick\])?$", ["tests/test_bench.py::test_bench_kernels_quick_writes_rows"]),
    (r"^python bench/bench_local_loss\.py( \[--quick\])?$", ["tests/test_gpu_check.py::test_gpu_check_dry_run"]),
    (r"^python bench/bench_data\.py( \[--quick\])?$", ["tests/test_gpu_check.py::test_gpu_check_dry_run"]),
    (r"^bash bench/profile\.sh \d+$", ["tests/test_gpu_check.py::test_gpu_check_dry_run"]),  # torch.profiler branch
    (r"^python bench/bench_checkpoint\.py$",
     ["tests/test_bench.py::test_bench_checkpoint_computed_bytes_and_a_written_checkpoint"]),
]


def _code_lines(text: str):
    """(line number, line) of the code blocks of a markdown text: fenced, and indented by 4 after a blank line."""
    fenced, indented, prev_blank = False, False, True
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            yield n, line
            continue
        if line.startswith("    ") and (prev_blank or indented) and not line.lstrip().startswith(("- ", "* ", "|")):
            indented = True
            yield n, line[4:]
        elif line.strip():
            indented = False
        prev_blank = not line.strip()


def documented_commands() -> list[tuple[str, int, str]]:
    """(doc file, line, command) of every command line in the README and docs."""
    out = []
    for doc in DOCS:
        pending, start = "", 0
        for n, line in _code_lines(doc.read_text()):
            text = line.rstrip()
            if pending:
                text = pending + " " + text.strip()
            else:
                start = n
            if text.endswith("\\"):
                pending = text[:-1].rstrip()
                continue
            pending = ""
            command = re.sub(r"\s+#\s.*$", "", text).strip()
            words = command.split()
            while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
                words = words[1:]
            if words and words[0] in PROGRAMS:
                out.append((str(doc.relative_to(REPO)), start, command))
    return out


def _test_exists(ref: str) -> bool:
    path, _, name = ref.partition("::")
    file = REPO / path
    if not file.is_file():
        return False
    if not name:
        return True
    return any(isinstance(node, ast.FunctionDef) and node.name == name for node in ast.walk(ast.parse(file.read_text())))


def test_every_documented_command_is_covered_by_a_test():
    commands = documented_commands()
    assert len(commands) > 40, f"found only {len(commands)} commands: is the parsing broken?"
    uncovered = [f"{doc}:{line}: {cmd}" for doc, line, cmd in commands
                 if not any(re.search(pattern, cmd) for pattern, _ in COVERAGE)]
    assert not uncovered, "commands in the docs that no COVERAGE entry maps to a test:\n" + "\n".join(uncovered)


def test_coverage_names_existing_tests_and_every_entry_is_used():
    commands = [cmd for _, _, cmd in documented_commands()]
    for pattern, refs in COVERAGE:
        assert refs, f"{pattern!r} names no test"
        missing = [r for r in refs if not _test_exists(r)]
        assert not missing, f"{pattern!r}: no such test {missing}"
        assert any(re.search(pattern, c) for c in commands), f"{pattern!r} matches no documented command (stale entry)"


def _concrete(command: str) -> list[str]:
    """The command's words with optional parts dropped, alternatives reduced to their first, ellipses gone."""
    text = command
    while True:  # innermost brackets first: [--a [--b]]
        reduced = re.sub(r"\s*\[[^\[\]]*\]", "", text)
        if reduced == text:
            break
        text = reduced
    text = text.replace("...", " ")
    words = shlex.split(text)
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]
    return [w.split("|")[0] if "|" in w and not w.startswith(("'", '"')) else w for w in words]


def _hptransfer_commands() -> list[tuple[str, int, list[str]]]:
    out = []
    for doc, line, cmd in documented_commands():
        words = _concrete(cmd)
        if words and words[0] in ("hptransfer", ".venv/bin/hptransfer"):
            out.append((doc, line, words[1:]))
        elif words[:3] == ["python", "-m", "hptransfer"] or words[:3] == ["python3", "-m", "hptransfer"]:
            out.append((doc, line, words[3:]))
    return out


@pytest.mark.parametrize("where,argv", [(f"{d}:{n}", a) for d, n, a in _hptransfer_commands()],
                         ids=[f"{d}:{n}" for d, n, _ in _hptransfer_commands()])
def test_documented_hptransfer_command_parses(where, argv):
    import argparse

    from hptransfer import cli

    if not argv or argv[0] in ("--help", "-h"):
        return
    parser = cli.build_parser(argv[0])
    try:
        args = cli.parse_args_with_overrides(parser, argv)
    except SystemExit as e:
        pytest.fail(f"{where}: `hptransfer {' '.join(argv)}` does not parse (exit {e.code})")
    if argv[0] == "data":  # `data` parses its subcommand's own options in run(): parse them here too
        from hptransfer.data import cli as data_cli

        add, _ = data_cli._functions(args.subcommand)
        sub = argparse.ArgumentParser(prog=f"hptransfer data {args.subcommand}")
        add(sub)
        try:
            sub.parse_args(args.rest)
        except SystemExit as e:
            pytest.fail(f"{where}: `hptransfer {' '.join(argv)}` does not parse (exit {e.code})")
