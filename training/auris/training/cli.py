"""``auris-train``: build, evaluate and export the models the agent and collector run.

Exit codes: 0 ok, 2 bad usage or data folder, 3 the exported model failed its parity check.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import f1_score
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from auris.agent import __version__
from auris.agent.features import NFSTREAM
from auris.agent.scoring import to_matrix
from auris.training.export import PARITY_TOLERANCE, export_classifier, parity, write_model
from auris.training.metrics import classifier_evaluation, split_by_time
from auris.training.pcap_flows import ATTACK, BENIGN, capture_files, flow_table
from auris.v1 import model_pb2

__all__ = ["main"]

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_USAGE, EXIT_PARITY = 0, 2, 3
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
    net.add_argument("--model-version", default="1")
    return p


def _train_network_pcap(args: argparse.Namespace) -> int:
    pcaps = args.data / "pcaps"
    if not (pcaps / "attack" / "labels.csv").is_file() or not (pcaps / "benign").is_dir():
        print(f"auris-train: {pcaps} needs benign/ and attack/labels.csv; pass --data DIR", file=sys.stderr)
        return EXIT_USAGE
    try:
        files = capture_files(args.data)
    except (KeyError, ValueError) as exc:
        print(f"auris-train: {pcaps / 'attack' / 'labels.csv'}: unexpected content ({exc})", file=sys.stderr)
        return EXIT_USAGE
    table = flow_table(
        files,
        NFSTREAM,
        args.max_flows_per_capture,
        progress=lambda fs: tqdm(fs, desc="metering captures", unit="pcap"),
    )
    x = to_matrix(table.rows, len(NFSTREAM.columns))
    y = np.asarray(table.labels)
    train, test = split_by_time(table.labels, table.first_seen_ms)

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
        y[test].tolist(),
        predicted.tolist(),
        attack_score,
        classes,
        BENIGN,
        split="by time inside each class: the latest 25% of each class's flows (first-seen time) held out",
    )

    # The same model on a random row split, to show how much a random split flatters it.
    r_train, r_test = train_test_split(np.arange(len(y)), test_size=0.25, random_state=0, stratify=y)
    random_model = forest().fit(x[r_train], y[r_train])
    evaluation.extra["random_split_macro_f1"] = float(
        f1_score(y[r_test], random_model.predict(x[r_test]), average="macro")
    )

    onnx_bytes = export_classifier(model, len(NFSTREAM.columns))
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
        feature_set=NFSTREAM,
        labels=classes,
        normal_label=BENIGN,
        threshold=threshold,
        threshold_method="0.5 on 1 - P(benign), not tuned",
        evaluation=evaluation,
        provenance=table.provenance,
        description=(
            f"Random forest ({args.trees} trees, depth <= {args.max_depth}) separating benign from "
            "attack flows; "
            f"trained on {len(train)} flows metered by the agent from {len(files)} labelled captures "
            f"(at most {args.max_flows_per_capture} flows per capture)."
        ),
        data_root=args.data,
    )
    print(f"wrote {manifest_path}")
    print(f"split: {evaluation.split}; {len(train)} train / {len(test)} test flows")
    print(f"{'class':<8} {'precision':>9} {'recall':>7} {'f1':>6} {'support':>8}")
    for c in evaluation.per_class:
        print(f"{c.label:<8} {c.precision:>9.3f} {c.recall:>7.3f} {c.f1:>6.3f} {c.support:>8}")
    print(
        f"macro F1 {evaluation.macro_f1:.3f} (baseline {evaluation.baseline_name}: "
        f"{evaluation.baseline_macro_f1:.3f}); weighted F1 {evaluation.weighted_f1:.3f} "
        f"(baseline {evaluation.baseline_weighted_f1:.3f}); PR-AUC {evaluation.pr_auc:.3f}; "
        f"benign FPR {evaluation.false_positive_rate:.3f}"
    )
    print(
        f"random split macro F1 {evaluation.extra['random_split_macro_f1']:.3f} (for contrast only); "
        f"ONNX parity max |diff| {diff:.1e}"
    )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.command == "network-pcap":
        return _train_network_pcap(args)
    parser.print_usage(sys.stderr)
    print("auris-train: a command is required (network-pcap)", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
