//! AuthorizationPolicy / PeerAuthentication resources (being written).
