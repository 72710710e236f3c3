"""``auris-train``: build, evaluate and export the models the agent and collector run.

Exit codes: 0 ok, 2 bad usage or data folder, 3 the exported model failed its parity check.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import f1_score
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from auris.agent import __version__
from auris.agent.drift import reference_distribution
from auris.agent.features import NFSTREAM
from auris.agent.meter import preload_in_meter_processes
from auris.agent.scoring import to_matrix
from auris.training.export import PARITY_TOLERANCE, PROBABILITIES, export_classifier, parity, write_model
from auris.training.metrics import (
    classifier_evaluation,
    detector_evaluation,
    natural_balance_weights,
    split_by_time,
)
from auris.training.pcap_flows import ATTACK, BENIGN, FlowTable, capture_files, flow_table
from auris.v1 import model_pb2

__all__ = ["main"]

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_USAGE, EXIT_PARITY = 0, 2, 3
# The autoencoder graph against its numpy/scikit-learn source, relative to max(1, |score|).
AE_PARITY_TOLERANCE = 1e-4
DEFAULT_DATA = Path("../shared/data")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="auris-train", description="Build, evaluate and export Auris models.")
    p.add_argument("--version", action="version", version=f"auris-train {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    net = sub.add_parser(
        "network-pcap",
        help="binary flow classifier on the nfstream feature set, from labelled captures",
    )
    net.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="data folder holding pcaps/ (default %(default)s)"
    )
    net.add_argument("--out", type=Path, default=Path("models"), help="output folder (default %(default)s)")
    net.add_argument("--max-flows-per-capture", type=int, default=2000)
    net.add_argument("--trees", type=int, default=40)
    net.add_argument("--max-depth", type=int, default=12)
    net.add_argument("--model-id", default="nfstream-rf")
    net.add_argument("--ae-model-id", default="nfstream-ae")
    net.add_argument(
        "--ae-target-fpr", type=float, default=0.01, help="benign false-positive rate to aim for"
    )
    net.add_argument("--ae-out", type=Path, help="autoencoder output folder (default OUT: loaded by default)")
    net.add_argument("--ae-seeds", type=int, default=5, help="autoencoders averaged (%(default)s)")
    net.add_argument("--ae-model-version", default="2")
    net.add_argument(
        "--only",
        choices=("forest", "autoencoder"),
        help="build one of the two models (default both)",
    )
    net.add_argument(
        "--signing-key",
        type=Path,
        help="Ed25519 private key (PEM) to sign the manifests with; unsigned without",
    )
    net.add_argument("--model-version", default="1")
    cic = sub.add_parser(
        "network-cic",
        help="classifier and benign-only detectors on the cicflowmeter set (CIC-IDS2017, TII-SSRC-23)",
    )
    cic.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="data folder holding network/ and pcaps/ (default %(default)s)",
    )
    cic.add_argument("--out", type=Path, default=Path("models"), help="output folder (default %(default)s)")
    cic.add_argument(
        "--candidates", type=Path, help="folder for the models not loaded by default (OUT/candidates)"
    )
    cic.add_argument("--reports", type=Path, help="folder for the evaluation reports (default OUT/reports)")
    cic.add_argument(
        "--default",
        action="append",
        choices=("cic-rf", "cic-ae", "cic-iforest", "cic-kmeans"),
        help="a model for OUT, loaded by default (repeatable; needs --signing-key); others: candidates",
    )
    cic.add_argument(
        "--signing-key",
        type=Path,
        help="Ed25519 private key (PEM) to sign the manifests with; unsigned without",
    )
    cic.add_argument("--trees", type=int, default=64)
    cic.add_argument("--max-depth", type=int, default=16)
    cic.add_argument(
        "--pcap-max-flows", type=int, default=2000, help="flows kept per capture in the pcap run"
    )
    cic.add_argument("--skip-pcaps", action="store_true", help="no run through the agent's extractor")
    cic.add_argument("--model-version", default="1")
    zoo = sub.add_parser("zoo", help="any model kind on any numeric table (CSV or Parquet), exported to ONNX")
    zoo.add_argument("--data", type=Path, required=True, help="a .csv, .csv.gz or .parquet table")
    zoo.add_argument(
        "--kind", required=True, help="one of the kinds, or 'all' to compare every kind in one report"
    )
    zoo.add_argument(
        "--label", help="label column (supervised kinds need it; others then fit on normal rows)"
    )
    zoo.add_argument("--time-column", help="column that orders rows in time (default: row order)")
    zoo.add_argument(
        "--features",
        choices=("numeric", "cicflowmeter"),
        default="numeric",
        help="feature columns: every numeric one, or the agent's cicflowmeter ones (default %(default)s)",
    )
    zoo.add_argument(
        "--normal-share", type=float, help="weight normal test rows to this share in the comparison"
    )
    zoo.add_argument(
        "--out", type=Path, default=Path("models/candidates"), help="output folder (%(default)s)"
    )
    zoo.add_argument("--report", type=Path, help="folder for the comparison report (default OUT/../reports)")
    zoo.add_argument("--model-id", help="model id (default: the kind)")
    zoo.add_argument("--signing-key", type=Path, help="Ed25519 private key (PEM) to sign the manifest with")
    for name, text in (
        (
            "transactions",
            "card-fraud models: gradient boosting alone vs the autoencoder hybrid (ULB, handbook-sim)",
        ),
        (
            "ticks",
            "tick detectors (robust z, local z, isolation forest, transformer) judged on injected anomalies",
        ),
    ):
        feed = sub.add_parser(name, help=text)
        feed.add_argument(
            "--data",
            type=Path,
            default=DEFAULT_DATA,
            help="data folder holding transactions/ and ticks/ (%(default)s)",
        )
        feed.add_argument(
            "--out", type=Path, default=Path("models/feeds"), help="output folder (%(default)s)"
        )
        feed.add_argument(
            "--candidates", type=Path, help="folder for models not shipped by default (OUT/candidates)"
        )
        feed.add_argument(
            "--reports", type=Path, default=Path("models/reports"), help="reports folder (%(default)s)"
        )
        feed.add_argument(
            "--signing-key", type=Path, help="Ed25519 private key (PEM) to sign the manifests with"
        )
        feed.add_argument("--model-version", default="1")
        feed.add_argument("--seed", type=int, default=0)
    return p


def _train_zoo(args: argparse.Namespace) -> int:

    from auris.agent.cicflowmeter import CICFLOWMETER_COLUMNS
    from auris.agent.signing import load_private_key
    from auris.training.zoo import KINDS, SUPERVISED, compare, read_table, save_model, train_model

    if args.kind != "all" and args.kind not in KINDS:
        print(
            f"auris-train: unknown kind {args.kind!r}; choose one of {', '.join(KINDS)} or all",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        key = load_private_key(args.signing_key) if args.signing_key else None
        table = read_table(args.data)
    except (OSError, ValueError) as exc:
        print(f"auris-train: {args.data}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    columns = (
        [c for c in CICFLOWMETER_COLUMNS if c in table.columns] if args.features == "cicflowmeter" else None
    )
    try:
        if args.kind == "all":
            if not args.label:
                print(
                    "auris-train: --kind all compares against a label: pass --label COLUMN", file=sys.stderr
                )
                return EXIT_USAGE
            name = "zoo-" + args.data.name.split(".")[0]
            if args.data.parent.name not in ("", "."):
                name = "zoo-" + args.data.parent.name
            report, models = compare(
                table,
                KINDS,
                args.label,
                args.report or args.out.parent / "reports",
                name,
                time_column=args.time_column,
                columns=columns,
                normal_share=args.normal_share,
                source=str(args.data),
                progress=lambda kinds: tqdm(kinds, desc="zoo", unit="model"),
            )
            for kind, model in models.items():
                print(f"wrote {save_model(args.out, model, key)} ({kind})")
            print(f"wrote {report}")
            return EXIT_OK
        model = train_model(
            table,
            args.kind,
            args.label,
            model_id=args.model_id,
            time_column=args.time_column,
            columns=columns,
            source=str(args.data),
        )
    except ValueError as exc:
        print(f"auris-train: {exc}", file=sys.stderr)
        return EXIT_USAGE
    path = save_model(args.out, model, key)
    evaluation = model.manifest.evaluation
    kind = "supervised" if args.kind in SUPERVISED else "anomaly detector"
    print(f"wrote {path} ({kind}; threshold {model.manifest.threshold.value:.6g})")
    if evaluation.per_class:
        print(
            f"macro F1 {evaluation.macro_f1:.4f} (baseline {evaluation.baseline_name}: "
            f"{evaluation.baseline_macro_f1:.4f}); PR-AUC {evaluation.pr_auc:.4f}; "
            f"normal FPR {evaluation.false_positive_rate:.4f}"
        )
    return EXIT_OK


def _train_feed(args: argparse.Namespace) -> int:
    from auris.agent.signing import load_private_key

    try:
        key = load_private_key(args.signing_key) if args.signing_key else None
    except ValueError as exc:
        print(f"auris-train: {exc}", file=sys.stderr)
        return EXIT_USAGE
    candidates = args.candidates or args.out / "candidates"

    def progress(items: Any, desc: str) -> Any:
        return tqdm(items, desc=desc, leave=False)

    if args.command == "transactions":
        from auris.training.feeds_tx import (
            HANDBOOK,
            ULB,
            handbook_table,
            ship_transactions,
            train_transactions,
            ulb_table,
        )

        for rel in (ULB, HANDBOOK):
            if not (args.data / rel).is_file():
                print(f"auris-train: {args.data / rel} is missing; pass --data DIR", file=sys.stderr)
                return EXIT_USAGE
        trained = [
            train_transactions(ulb_table(args.data / ULB), seed=args.seed, progress=progress),
            train_transactions(
                handbook_table(args.data / HANDBOOK, progress=progress), seed=args.seed, progress=progress
            ),
        ]
        for t in trained:
            for name, v in t.variants.items():
                if v.parity_tree > 1e-5 or v.parity_ae > 1e-4:
                    print(
                        f"auris-train: {t.table.name} {name}: ONNX parity {v.parity_tree:.1e} / "
                        f"{v.parity_ae:.1e} exceeds 1e-5 / 1e-4; not writing",
                        file=sys.stderr,
                    )
                    return EXIT_PARITY
            print(f"{t.table.name}: {t.decision}")
        written = ship_transactions(
            trained, args.out, candidates, args.reports, version=args.model_version, data_root=args.data,
            signing_key=key,
        )  # fmt: skip
    else:
        from auris.training.feeds_tick import ship_ticks, train_ticks

        if not (args.data / "ticks").is_dir():
            print(f"auris-train: {args.data / 'ticks'} is missing; pass --data DIR", file=sys.stderr)
            return EXIT_USAGE
        results = train_ticks(args.data / "ticks", seed=args.seed, progress=progress)
        for name, detector in results.detectors.items():
            if detector.parity > 1e-4:
                print(
                    f"auris-train: {name}: ONNX parity {detector.parity:.1e} exceeds 1e-4; not writing",
                    file=sys.stderr,
                )
                return EXIT_PARITY
        print(f"default tick detector: {results.default} (best mean F1 over the injected types)")
        written = ship_ticks(
            results, args.out, candidates, args.reports, version=args.model_version, data_root=args.data,
            signing_key=key,
        )  # fmt: skip
    for path in written:
        print(f"wrote {path}")
    return EXIT_OK


def _train_network_cic(args: argparse.Namespace) -> int:
    from auris.agent.signing import load_private_key
    from auris.training.network_cic import Options, train_network_cic

    if args.default and not args.signing_key:
        print("auris-train: --default needs --signing-key (agents refuse unsigned models)", file=sys.stderr)
        return EXIT_USAGE

    try:
        key = load_private_key(args.signing_key) if args.signing_key else None
    except ValueError as exc:
        print(f"auris-train: {exc}", file=sys.stderr)
        return EXIT_USAGE
    options = Options(
        data=args.data,
        out=args.out,
        candidates=args.candidates or args.out / "candidates",
        reports=args.reports or args.out / "reports",
        trees=args.trees,
        max_depth=args.max_depth,
        version=args.model_version,
        defaults=tuple(args.default or ()),
        pcap_max_flows=args.pcap_max_flows,
        skip_pcaps=args.skip_pcaps,
        signing_key=key,
    )

    def progress(items: Sequence[Any], desc: str) -> Any:
        return tqdm(items, desc=desc, unit="step" if desc == "training" else "pcap")

    try:
        written = train_network_cic(options, progress)
    except FileNotFoundError as exc:
        print(f"auris-train: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as exc:  # a parity check failed: nothing half-written is worth shipping
        print(f"auris-train: {exc}", file=sys.stderr)
        return EXIT_PARITY
    for path in written:
        print(f"wrote {path}")
    print(f"reports in {options.reports}")
    return EXIT_OK


def _train_network_pcap(args: argparse.Namespace) -> int:
    from auris.agent.signing import load_private_key

    pcaps = args.data / "pcaps"
    if not (pcaps / "attack" / "labels.csv").is_file() or not (pcaps / "benign").is_dir():
        print(f"auris-train: {pcaps} needs benign/ and attack/labels.csv; pass --data DIR", file=sys.stderr)
        return EXIT_USAGE
    try:
        files = capture_files(args.data)
        key = load_private_key(args.signing_key) if args.signing_key else None
    except (KeyError, ValueError) as exc:
        print(f"auris-train: {exc}", file=sys.stderr)
        return EXIT_USAGE
    table = flow_table(
        files,
        NFSTREAM,
        args.max_flows_per_capture,
        progress=lambda fs: tqdm(fs, desc="metering captures", unit="pcap"),
    )
    x = to_matrix(table.rows, len(NFSTREAM.columns))
    y = np.asarray(table.labels)
    common = {
        "feature_set": NFSTREAM,
        "provenance": table.provenance,
        "data_root": args.data,
        "signing_key": key,
    }
    source = (
        f"flows metered by the agent from {len(files)} labelled captures "
        f"(at most {args.max_flows_per_capture} flows per capture)"
    )
    status = EXIT_OK
    if args.only in (None, "forest"):
        train, test = split_by_time(table.labels, table.first_seen_ms)
        status = _train_forest(args, x, y, train, test, common, f"{len(train)} {source}")
    if status == EXIT_OK and args.only in (None, "autoencoder"):
        status = _train_flow_autoencoder(args, x, y, table, common, source)
    return status


_SPLIT = "by time inside each class: the latest 25% of each class's flows (first-seen time) held out"


def _report(manifest_path: Path, evaluation: model_pb2.Evaluation, n_train: int, n_test: int) -> None:
    print(f"wrote {manifest_path}")
    print(f"split: {evaluation.split}; {n_train} train / {n_test} test flows")
    print(f"{'class':<8} {'precision':>9} {'recall':>7} {'f1':>6} {'support':>8}")
    for c in evaluation.per_class:
        print(f"{c.label:<8} {c.precision:>9.3f} {c.recall:>7.3f} {c.f1:>6.3f} {c.support:>8}")
    print(
        f"macro F1 {evaluation.macro_f1:.3f} (baseline {evaluation.baseline_name}: "
        f"{evaluation.baseline_macro_f1:.3f}); weighted F1 {evaluation.weighted_f1:.3f} "
        f"(baseline {evaluation.baseline_weighted_f1:.3f}); PR-AUC {evaluation.pr_auc:.3f}; "
        f"benign FPR {evaluation.false_positive_rate:.3f}"
    )
    print("  ".join(f"{k} {v:.3g}" for k, v in sorted(evaluation.extra.items())))


def _write_report(
    folder: Path,
    model_id: str,
    description: str,
    evaluation: model_pb2.Evaluation,
    y_test: npt.NDArray[np.str_],
    predicted: Sequence[str],
    labels: Sequence[str],
    attack_score: npt.NDArray[np.float64],
    importance: npt.NDArray[np.float64],
    appendix: str = "",
) -> Path:
    """models/reports/<id>.md with its confusion matrix, PR/ROC curves and feature importances."""
    from auris.training import reports

    folder.mkdir(parents=True, exist_ok=True)
    png = {part: folder / f"{model_id}-{part}.png" for part in ("confusion", "curves", "importance")}
    reports.plot_confusion(list(y_test), list(predicted), labels, png["confusion"], model_id)
    roc_auc = reports.plot_curves(y_test != BENIGN, attack_score, png["curves"], model_id)
    reports.plot_importances(list(NFSTREAM.columns), importance, png["importance"], f"{model_id} importance")
    extra = "\n".join(f"- {k}: {v:.4g}" for k, v in sorted(evaluation.extra.items()))
    text = (
        f"# {model_id}\n\n{description}\n\n" + reports.evaluation_markdown(evaluation)
        + f"\nROC AUC: {roc_auc:.4f}.\n\n{extra}\n\n"
        + f"![confusion matrix]({model_id}-confusion.png)\n\n![PR and ROC]({model_id}-curves.png)\n\n"
        + f"![feature importance]({model_id}-importance.png)\n"
        + (f"\n{appendix}" if appendix else "")
    )  # fmt: skip
    path = folder / f"{model_id}.md"
    path.write_text(text, encoding="utf-8")
    return path


def _importance(
    onnx_bytes: bytes,
    output: str,
    x: npt.NDArray[np.float32],
    is_attack: npt.NDArray[np.bool_],
    column: int | None,
) -> npt.NDArray[np.float64]:
    """Permutation importance through the exported graph (attack score: 1 - P(benign), or the score)."""
    from auris.training import reports

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])

    def score_of(out: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
        score = 1.0 - out[:, column] if column is not None else out.reshape(len(out), -1)[:, 0]
        return np.asarray(score, dtype=np.float64)

    return reports.permutation_importance(session, output, x, is_attack, score_of, np.ones(len(x)))


def _train_forest(
    args: argparse.Namespace,
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.str_],
    train: npt.NDArray[np.intp],
    test: npt.NDArray[np.intp],
    common: dict[str, Any],
    source: str,
) -> int:
    def forest() -> RandomForestClassifier:
        return RandomForestClassifier(
            n_estimators=args.trees,
            max_depth=args.max_depth,
            min_samples_leaf=2,
            class_weight="balanced",
            n_jobs=2,
            random_state=0,
        )

    model = forest().fit(x[train], y[train])
    classes = [str(c) for c in model.classes_]
    probabilities = model.predict_proba(x[test])
    attack_score = 1.0 - probabilities[:, classes.index(BENIGN)]
    threshold = 0.5
    predicted = np.where(attack_score >= threshold, ATTACK, BENIGN)
    evaluation = classifier_evaluation(
        y[test].tolist(), predicted.tolist(), attack_score, classes, BENIGN, _SPLIT
    )

    # The same model on a random row split, to show how much a random split flatters it.
    r_train, r_test = train_test_split(np.arange(len(y)), test_size=0.25, random_state=0, stratify=y)
    random_model = forest().fit(x[r_train], y[r_train])
    evaluation.extra["random_split_macro_f1"] = float(
        f1_score(y[r_test], random_model.predict(x[r_test]), average="macro")
    )

    onnx_bytes = export_classifier(model, x.shape[1])
    diff = parity(onnx_bytes, model, x[test])
    evaluation.extra["onnx_parity_max_abs_diff"] = diff
    if diff > PARITY_TOLERANCE:
        print(
            f"auris-train: ONNX parity {diff:.2e} exceeds {PARITY_TOLERANCE:.0e}; not writing",
            file=sys.stderr,
        )
        return EXIT_PARITY
    manifest_path = write_model(
        args.out,
        args.model_id,
        onnx_bytes,
        model_id=args.model_id,
        version=args.model_version,
        kind=model_pb2.MODEL_KIND_CLASSIFIER,
        labels=classes,
        normal_label=BENIGN,
        threshold=threshold,
        threshold_method="0.5 on 1 - P(benign), not tuned",
        evaluation=evaluation,
        reference=reference_distribution(
            x[train], 1.0 - model.predict_proba(x[train])[:, classes.index(BENIGN)], NFSTREAM.columns
        ),
        description=(
            f"Random forest ({args.trees} trees, depth <= {args.max_depth}) separating benign from "
            f"attack flows; trained on {source}."
        ),
        **common,
    )
    _report(manifest_path, evaluation, len(train), len(test))
    importance = _importance(onnx_bytes, PROBABILITIES, x[test], y[test] != BENIGN, classes.index(BENIGN))
    description = f"Random forest ({args.trees} trees, depth <= {args.max_depth}); trained on {source}."
    report = _write_report(
        args.out / "reports", args.model_id, description, evaluation, y[test], predicted.tolist(), classes,
        attack_score, importance,
    )  # fmt: skip
    print(f"wrote {report}")
    return EXIT_OK


# The captures have no natural class balance; weight benign test flows to CIC-IDS2017's (75%).
_BENIGN_SHARE = 0.75
_CAPTURE_SPLIT = (
    "by time inside each capture: the latest 25% of each capture's flows (first-seen time) held out; "
    f"benign test flows weighted to a {_BENIGN_SHARE:.0%} share (CIC-IDS2017's natural balance)"
)
_HOLDOUT_FOLDS = 4


def _fit_and_calibration(
    train: npt.NDArray[np.intp], y: npt.NDArray[np.str_], captures: npt.NDArray[np.str_], times: list[int]
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Benign training flows: inside each capture the latest 20% calibrate, the rest fit."""
    benign = train[y[train] == BENIGN]
    fit, calibration = split_by_time(captures[benign].tolist(), [times[i] for i in benign], 0.2)
    return benign[fit], benign[calibration]


def _capture_holdout(
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.str_],
    captures: npt.NDArray[np.str_],
    fit_rows: npt.NDArray[np.intp],
    calibration: npt.NDArray[np.intp],
    attack_test: npt.NDArray[np.intp],
    seeds: Sequence[int],
    target_fpr: float,
) -> tuple[list[float], list[float]]:
    """Benign captures never seen in fitting or calibration: (benign FPR, attack recall) per fold.

    Agents meet applications no training capture holds; the split inside each capture cannot
    show how the threshold holds on those.
    """
    from auris.training.flow_autoencoder import fit_flow_autoencoder

    names = np.unique(captures[y == BENIGN])
    np.random.default_rng(0).shuffle(names)
    fprs, recalls = [], []
    for fold in np.array_split(names, _HOLDOUT_FOLDS):
        out = np.isin(captures, fold)
        model = fit_flow_autoencoder(x[fit_rows[~out[fit_rows]]], NFSTREAM.columns, seeds=seeds)
        cal_scores, _ = model.reference(x[calibration[~out[calibration]]])
        threshold = float(np.quantile(cal_scores, 1 - target_fpr))
        benign_out = np.flatnonzero(out & (y == BENIGN))
        fprs.append(float((model.reference(x[benign_out])[0] >= threshold).mean()))
        recalls.append(float((model.reference(x[attack_test])[0] >= threshold).mean()))
    return fprs, recalls


def _train_flow_autoencoder(
    args: argparse.Namespace,
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.str_],
    table: FlowTable,
    common: dict[str, Any],
    source: str,
) -> int:
    from sklearn.metrics import roc_auc_score

    from auris.training.flow_autoencoder import (
        ERRORS_OUTPUT,
        INPUT_NAME,
        SCORE_OUTPUT,
        SHAPES,
        fit_flow_autoencoder,
        flow_shapes,
    )

    captures = np.asarray(table.captures)
    train, test = split_by_time(table.captures, table.first_seen_ms)  # inside each capture
    fit_rows, calibration = _fit_and_calibration(train, y, captures, table.first_seen_ms)
    seeds = tuple(range(args.ae_seeds))
    model = fit_flow_autoencoder(x[fit_rows], NFSTREAM.columns, seeds=seeds)
    calibration_scores, _ = model.reference(x[calibration])
    threshold = float(np.quantile(calibration_scores, 1 - args.ae_target_fpr))
    all_scores = model.reference(x)[0].astype(np.float64)
    scores = all_scores[test]
    y_test = y[test]
    weights = natural_balance_weights(["pcaps"] * len(test), y_test, BENIGN, {"pcaps": _BENIGN_SHARE})
    evaluation = detector_evaluation(y_test.tolist(), scores, threshold, BENIGN, _CAPTURE_SPLIT, weights)
    is_attack = y_test != BENIGN
    flagged = scores >= threshold
    extra = evaluation.extra
    extra["benign_share"] = _BENIGN_SHARE
    extra["attack_f1_flag_everything"] = float(
        f1_score(is_attack, np.ones(len(test), dtype=bool), sample_weight=weights)
    )
    extra["attack_f1_unweighted"] = float(f1_score(is_attack, flagged))
    extra["attack_share_unweighted"] = float(is_attack.mean())
    extra["attack_f1_flag_everything_unweighted"] = float(f1_score(is_attack, np.ones(len(test), dtype=bool)))
    extra["roc_auc"] = float(roc_auc_score(is_attack, scores))
    extra["calibration_fpr"] = float((calibration_scores >= threshold).mean())
    extra["test_attack_flag_rate"] = float(flagged[is_attack].mean())
    extra["test_benign_flag_rate"] = float(flagged[~is_attack].mean())
    shapes = flow_shapes(x[test], NFSTREAM.columns)
    for s, shape in enumerate(SHAPES):
        benign_of_shape = ~is_attack & (shapes == s)
        if benign_of_shape.any():
            extra[f"test_benign_fpr_{shape.replace(' ', '_').replace('-', '_')}"] = float(
                flagged[benign_of_shape].mean()
            )
    test_captures = captures[test]
    attack_captures = sorted(set(test_captures[is_attack].tolist()))
    # Each attack capture counts once: floods and scans hold most attack flows.
    extra["attack_recall_capture_macro"] = float(
        np.mean([flagged[test_captures == name].mean() for name in attack_captures])
    )
    extra["pr_auc_flag_everything"] = float(np.average(is_attack, weights=weights))
    everything = all_scores >= threshold
    extra["all_flows_attack_flag_rate"] = float(everything[y != BENIGN].mean())
    extra["all_flows_benign_flag_rate"] = float(everything[y == BENIGN].mean())
    fprs, recalls = _capture_holdout(
        x, y, captures, fit_rows, calibration, test[is_attack], seeds, args.ae_target_fpr
    )
    extra["capture_holdout_benign_fpr_mean"] = float(np.mean(fprs))
    extra["capture_holdout_benign_fpr_max"] = float(np.max(fprs))
    extra["capture_holdout_attack_recall_mean"] = float(np.mean(recalls))
    extra["capture_holdout_attack_recall_min"] = float(np.min(recalls))

    onnx_bytes = model.to_onnx()
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    (onnx_scores,) = session.run([SCORE_OUTPUT], {INPUT_NAME: x})
    diff = float(np.max(np.abs(np.asarray(onnx_scores) - all_scores) / np.maximum(1.0, np.abs(all_scores))))
    extra["onnx_parity_max_rel_diff"] = diff
    if diff > AE_PARITY_TOLERANCE:
        print(
            f"auris-train: autoencoder ONNX parity {diff:.2e} exceeds {AE_PARITY_TOLERANCE:.0e}; not writing",
            file=sys.stderr,
        )
        return EXIT_PARITY
    width = len(model.derived_names)
    hidden = "-".join(str(h) for h in model.mlps[0].hidden_layer_sizes)
    description = (
        f"{len(seeds)} MLP autoencoders ({width}-{hidden}-{width}, relu, errors averaged) fitted on "
        f"{len(fit_rows)} benign flows only (the earliest 80% of each benign capture's training "
        "flows); inside the graph: protocol one-hot, IPv6, each direction's TCP flag shares, "
        "one-sided and one-packet indicators, log1p of every count, size and time, robust scaling "
        "(benign median and IQR); score = mean squared reconstruction error per derived feature, "
        "each divided by its mean on benign training flows of the same shape (one packet, one-sided, "
        f"two-sided); {source}."
    )
    manifest_path = write_model(
        args.ae_out or args.out,
        args.ae_model_id,
        onnx_bytes,
        model_id=args.ae_model_id,
        version=args.ae_model_version,
        kind=model_pb2.MODEL_KIND_AUTOENCODER,
        labels=[],
        normal_label=BENIGN,
        score_output=SCORE_OUTPUT,
        explanation_output=ERRORS_OUTPUT,
        threshold=threshold,
        threshold_method=(
            f"{1 - args.ae_target_fpr:.3f} quantile of the scores of {len(calibration)} benign "
            "calibration flows (the latest 20% of each benign capture's training flows, held out of "
            f"fitting): a {args.ae_target_fpr:.1%} target FPR; no attack flow chose it"
        ),
        evaluation=evaluation,
        reference=reference_distribution(x[fit_rows], all_scores[fit_rows], NFSTREAM.columns),
        description=description,
        **common,
    )
    _report(manifest_path, evaluation, len(fit_rows), len(test))
    predicted = np.where(flagged, ATTACK, BENIGN)
    importance = _importance(onnx_bytes, SCORE_OUTPUT, x[test], is_attack, None)
    appendix = _baseline_markdown(evaluation) + _capture_rates_markdown(
        captures, y, test, flagged, everything, fprs, recalls
    )
    report = _write_report(
        args.out / "reports", args.ae_model_id, description, evaluation, y_test, predicted.tolist(),
        [ATTACK, BENIGN], scores, importance, appendix,
    )  # fmt: skip
    print(f"wrote {report}")
    return EXIT_OK


def _baseline_markdown(evaluation: model_pb2.Evaluation) -> str:
    """The attack class beside flag-everything, figure by figure, at both balances."""
    from auris.training.reports import markdown_table

    e = evaluation.extra
    attack = next(c for c in evaluation.per_class if c.label == ATTACK)
    share, own = e["benign_share"], e["attack_share_unweighted"]
    rows: list[tuple[object, ...]] = [
        ("precision", attack.precision, e["pr_auc_flag_everything"]),
        ("recall", attack.recall, 1.0),
        ("F1", attack.f1, e["attack_f1_flag_everything"]),
        ("PR-AUC", evaluation.pr_auc, e["pr_auc_flag_everything"]),
        ("benign false-positive rate", evaluation.false_positive_rate, 1.0),
        (f"F1 at the test rows' own balance ({own:.0%} attack)", e["attack_f1_unweighted"],
         e["attack_f1_flag_everything_unweighted"]),
        ("recall, each attack capture counted once", e["attack_recall_capture_macro"], 1.0),
    ]  # fmt: skip
    return (
        f"## The attack class beside flag-everything\n\nBenign test flows weighted to {share:.0%} "
        f"unless said otherwise. At the test rows' own balance (flood captures make {own:.0%} of them "
        "attack) flagging everything scores higher F1: that balance is an artefact of the captures. "
        "The PR and ROC curves above are drawn at that balance too.\n\n"
        + markdown_table(("figure", "model", "flag everything"), rows)
        + "\n"
    )


def _capture_rates_markdown(
    captures: npt.NDArray[np.str_],
    y: npt.NDArray[np.str_],
    test: npt.NDArray[np.intp],
    flagged_test: npt.NDArray[np.bool_],
    flagged_all: npt.NDArray[np.bool_],
    holdout_fprs: Sequence[float],
    holdout_recalls: Sequence[float],
) -> str:
    """Per attack capture and for the benign captures together: the share of flows flagged."""
    from auris.training.reports import markdown_table

    rows: list[tuple[object, ...]] = []
    test_captures = captures[test]
    for name in sorted(set(captures[y != BENIGN].tolist()), key=str.lower):
        in_test = test_captures == name
        in_all = captures == name
        rows.append(
            (name, int(in_test.sum()), float(flagged_test[in_test].mean()) if in_test.any() else "-",
             int(in_all.sum()), float(flagged_all[in_all].mean()))
        )  # fmt: skip
    benign_test = y[test] == BENIGN
    benign_all = y == BENIGN
    rows.append(
        ("all benign captures", int(benign_test.sum()), float(flagged_test[benign_test].mean()),
         int(benign_all.sum()), float(flagged_all[benign_all].mean()))
    )  # fmt: skip
    folds = ", ".join(f"{f:.3f}" for f in holdout_fprs)
    recalls = ", ".join(f"{r:.3f}" for r in holdout_recalls)
    return (
        "## Flows flagged per capture\n\n"
        "Test = the latest 25% of the capture's flows; all = every flow kept (at most 2,000 per "
        "capture), training flows included (benign training flows were fitted, so their rate flatters).\n\n"
        + markdown_table(("capture", "test flows", "test flagged", "all flows", "all flagged"), rows)
        + f"\nBenign captures never seen in fitting or calibration ({_HOLDOUT_FOLDS} folds of whole "
        f"captures, the model refitted each time): benign FPR per fold {folds}; recall on the attack "
        f"test flows {recalls}.\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.command == "network-pcap":
        preload_in_meter_processes(__name__)
        return _train_network_pcap(args)
    if args.command == "network-cic":
        preload_in_meter_processes(__name__)
        return _train_network_cic(args)
    if args.command == "zoo":
        return _train_zoo(args)
    if args.command in ("transactions", "ticks"):
        return _train_feed(args)
    parser.print_usage(sys.stderr)
    print(
        "auris-train: a command is required (network-pcap, network-cic, zoo, transactions, ticks)",
        file=sys.stderr,
    )
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
