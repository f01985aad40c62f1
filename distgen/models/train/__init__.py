"""Training the embedded models on data we generate (issue 17).

- :mod:`.scenes`: seeded procedural shape scenes and moving-shape clips with captions from a closed
  vocabulary, rendered anti-aliased with Pillow, and the exact word-level tokenizer of that vocabulary
- :mod:`.checker`: prompt adherence of an image (objects found with the right colour, shape and
  position), seam energy at patch boundaries, object trajectories across clip boundaries
- :mod:`.train_image`: trains a VAE, a text encoder and a UNet (SD layout) or DiT (PixArt layout) on
  the scenes and saves a diffusers pipeline directory
"""
