"""Parallel strategies, one module each; each applies itself to an unmodified model.

``distgen.parallel.cfg``    split the classifier-free-guidance batch over 2 ranks
``distgen.parallel.patch``  latent row bands: sync / displaced (DistriFusion) / partial (PCPP) / naive
``distgen.parallel.pipefusion``  DiT blocks in stages, image patches pipelined through them (PipeFusion, stale K/V)
``distgen.parallel.sequence``  exact sequence parallelism for DiTs: ulysses (all-to-all) / ring (K/V ring)
``distgen.parallel.tensor``  Megatron tensor parallelism for LLMs (with Ladder Residual overlap)
``distgen.parallel.pipeline``  LLM pipeline stages over micro-batches (async P2P, receives posted ahead)
``distgen.parallel.clip``  video frames in clips: exact / dual-scope (Video-Infinity) / naive, optional stale context
"""
