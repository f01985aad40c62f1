"""distgen on Kubernetes: the ``DistgenService`` resource and its operator.

- :mod:`distgen.cluster.spec`: the resource's fields (the one source of the CRD schema) and the
  validation the schema cannot express, done with distgen's own code;
- :mod:`distgen.cluster.crd`: the CustomResourceDefinition rendered from them;
- :mod:`distgen.cluster.desired`: the child objects a spec wants (pure);
- :mod:`distgen.cluster.decide`: group state, the next actions and the status (pure);
- :mod:`distgen.cluster.operator`: kopf handlers and the idempotent ``reconcile``;
- :mod:`distgen.cluster.pod`: what each pod runs (Ray head / worker, torchrun node).

``python -m distgen.cluster run`` runs the operator against the current kubeconfig;
``python -m distgen.cluster crd`` prints the CRD.
"""
