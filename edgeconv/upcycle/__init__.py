"""Dense2MoE: fuse runs of redundant layers of a dense model into MoE layers (`edgeconv upcycle`)."""
