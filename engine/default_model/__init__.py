"""The pipeline that makes deltaserve's default model: data (the Python standard library), a
byte-level BPE tokenizer, three same-size models (Gated DeltaNet, a Llama-style transformer, a
GDN + sliding-window-attention hybrid), training, held-out evaluation in bits per byte, and the
model card. See docs/default_model.md for the commands.
"""
