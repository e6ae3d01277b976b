"""Images and models: frames, camera, motion gate, model manifests (`models`),
runtimes, decoders and the detector that joins them.

`tensors` is the leaf runtimes and decoders share, so decoders import no runtime.
"""
