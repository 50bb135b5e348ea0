"""Edge <-> cloud split inference: codecs for hidden states, the wire protocol, the cloud server, the edge client."""
