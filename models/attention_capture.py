"""What the ViT and BERT attention modules share for Grad-CAM: the saved attention map and its gradient."""


class AttentionCapture:
    """Mixin for an attention module that can keep its probabilities and their gradient (official method names)."""

    def init_capture(self):
        """No map and no gradient saved yet."""
        self.attention_map = None
        self.attn_gradients = None

    def save_attn_gradients(self, grad):
        """Backward hook on the saved attention probabilities."""
        self.attn_gradients = grad

    def get_attn_gradients(self):
        """Gradient of the saved attention probabilities (set on backward)."""
        return self.attn_gradients

    def get_attention_map(self):
        """Attention probabilities saved by the last forward with capture on, [B, heads, queries, keys]."""
        return self.attention_map
