"""TRuST engine: selective, neuron-level concept unlearning for Stable-Diffusion-style UNets.
Host-agnostic (torch + diffusers + transformers + safetensors); ComfyUI and AUTOMATIC1111 adapters call it.
"""

__version__ = "0.1.0"
