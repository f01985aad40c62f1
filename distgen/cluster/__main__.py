"""``python -m distgen.cluster run|crd``: run the operator locally, or print the CRD."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m distgen.cluster", description="the DistgenService operator")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the operator against a cluster (the current kubeconfig)")
    run.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, "
                                                        "or the in-cluster service account)")
    run.add_argument("--namespace", action="append", default=[],
                     help="watch only this namespace (repeatable; default: all namespaces)")
    run.add_argument("--peering", action="store_true",
                     help="coordinate with other operator replicas through kopf peering (needs its CRDs); "
                          "default: standalone")
    run.add_argument("--liveness", default=None, help="serve a liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    run.add_argument("--log-level", default="INFO")
    commands.add_parser("crd", help="print the CustomResourceDefinition (YAML)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "crd":
        from distgen.cluster.crd import render_yaml

        sys.stdout.write(render_yaml())
        return 0
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # kopf logs every handler's success at INFO; our own Events and log lines say what happened
    logging.getLogger("kopf.objects").setLevel(max(logging.WARNING, logging.getLogger().level))
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    from kubernetes import config

    try:
        config.load_kube_config(config_file=args.kubeconfig)
    except config.ConfigException:
        config.load_incluster_config()
    import kopf

    import distgen.cluster.operator  # noqa: F401  (registers the handlers)

    kopf.run(standalone=not args.peering, namespaces=args.namespace, clusterwide=not args.namespace,
             liveness_endpoint=args.liveness)
    return 0


if __name__ == "__main__":
    sys.exit(main())
