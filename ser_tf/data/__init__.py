"""Data: corpus adapters, audio decoding and resampling, tf.data pipelines, synthetic corpus."""
