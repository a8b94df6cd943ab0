/// Why a memory node's NIC refused a verb. A real NIC reports all of these as
/// `IBV_WC_REM_ACCESS_ERR` (or `IBV_WC_REM_INV_REQ_ERR` for a misaligned atomic); the
/// simulated NIC says which rule was broken.
public enum RemoteAccessViolation: Error, Sendable, Hashable, CustomStringConvertible {
    /// No region or window has this key's index, or it is in another protection domain.
    case unknownKey
    /// The key names a window whose current binding has another tag (it was rebound).
    case staleKey
    /// The key names a window that is not bound (never bound, or invalidated).
    case windowInvalidated
    /// The access falls outside the region or window the key covers.
    case outOfBounds
    /// The region or window does not grant this access.
    case permissionDenied(needed: RemoteAccess)
    /// An atomic verb on an address that is not 8-byte aligned.
    case misalignedAtomic
    /// A verb whose length is zero or negative.
    case invalidLength
    /// A real NIC refused the access (`IBV_WC_REM_ACCESS_ERR`) without saying which rule
    /// was broken: an unknown, stale or invalidated key, a key of another protection
    /// domain, an access outside the region or window, or one it does not grant.
    case accessRefused
    /// A real NIC found the request invalid (`IBV_WC_REM_INV_REQ_ERR`): an operation the
    /// QP or region does not allow, or a length it cannot serve.
    case invalidRequest
    /// A real NIC could not complete the operation at the responder (`IBV_WC_REM_OP_ERR`).
    case remoteOperationFailed

    public var description: String {
        switch self {
        case .unknownKey: "unknown rkey"
        case .staleKey: "stale rkey (window rebound)"
        case .windowInvalidated: "window invalidated"
        case .outOfBounds: "out of bounds"
        case .permissionDenied(let needed): "permission denied (needs \(needed.rawValue))"
        case .misalignedAtomic: "misaligned atomic"
        case .invalidLength: "invalid length"
        case .accessRefused: "remote access refused by the NIC (IBV_WC_REM_ACCESS_ERR)"
        case .invalidRequest: "invalid request (IBV_WC_REM_INV_REQ_ERR)"
        case .remoteOperationFailed: "remote operation error (IBV_WC_REM_OP_ERR)"
        }
    }
}

/// The errors of the fabric seam.
public enum FabricError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The remote NIC refused verb `verbIndex` of the batch. The connection is broken from
    /// then on, as a reliable-connected QP enters the error state.
    case remoteAccess(RemoteAccessViolation, address: RemoteAddress, rkey: RKey, verbIndex: Int)
    /// The connection is in the error state (after an earlier error, or broken by a fault);
    /// no verb of the batch executed.
    case connectionBroken(NodeID)
    /// The remote node is gone.
    case peerDead(NodeID)
    /// The local node crashed while the batch was outstanding (simulation only):
    /// `executedVerbs` verbs of the batch had taken effect; the rest, already posted to the
    /// NIC, may still execute later unless the node is fenced.
    case localCrash(executedVerbs: Int)
    /// The local NIC failed verb `verbIndex` of the batch (a local protection, length or
    /// operation error, a bad response, a fatal device error: the work completion's status
    /// is in `status`). The connection is broken from then on.
    case localNIC(status: String, verbIndex: Int)

    public var description: String {
        switch self {
        case .remoteAccess(let why, let address, let rkey, let index):
            "remote access error at verb \(index): \(why) (address \(address), \(rkey))"
        case .connectionBroken(let node): "connection to \(node) is broken"
        case .peerDead(let node): "\(node) is dead"
        case .localCrash(let executed): "local node crashed after \(executed) verbs of the batch"
        case .localNIC(let status, let index): "the local NIC failed verb \(index): \(status)"
        }
    }
}
