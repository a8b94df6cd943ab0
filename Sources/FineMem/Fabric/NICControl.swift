/// A protection domain: a key works only on connections of its own domain, as an rkey
/// works only on QPs of the PD it was registered in.
package struct ProtectionDomain: Hashable, Sendable {
    package let id: UInt32
    package init(id: UInt32) { self.id = id }
}

/// A registered memory region (`ibv_reg_mr`).
package struct MemoryRegion: Hashable, Sendable {
    package let rkey: RKey
    package let address: RemoteAddress
    package let length: UInt64
    package let access: RemoteAccess
    package let protectionDomain: ProtectionDomain
}

/// A type-1 memory window (`ibv_alloc_mw`), bound and invalidated by the memory node that
/// owns the NIC.
package struct MemoryWindow: Hashable, Sendable {
    /// The 24-bit index; the current key is this index with the current tag.
    package let index: UInt32
    package let protectionDomain: ProtectionDomain
}

/// Errors of a memory node's local calls on its NIC (registration, binding, connecting).
package enum NICControlError: Error, Sendable, Hashable, CustomStringConvertible {
    case poolUnavailable(bytes: UInt64)
    case rangeOutsidePool(address: RemoteAddress, length: UInt64)
    case noSuchRegion(RKey)
    case noSuchWindow(UInt32)
    case regionHasBoundWindows(RKey)
    case bindOutsideRegion(address: RemoteAddress, length: UInt64)
    case bindExceedsRegionAccess
    case protectionDomainMismatch
    case keySpaceExhausted
    /// The device cannot serve (a missing capability, a limit too low, a failed call).
    case device(String)
    /// A queue pair could not be created or connected.
    case connectionFailed(String)

    package var description: String {
        switch self {
        case .poolUnavailable(let bytes): "cannot map a pool of \(bytes) bytes"
        case .rangeOutsidePool(let address, let length): "\(length) bytes at \(address) are outside the pool"
        case .noSuchRegion(let key): "no region has \(key)"
        case .noSuchWindow(let index): "no window has index \(index)"
        case .regionHasBoundWindows(let key): "the region of \(key) still has bound windows"
        case .bindOutsideRegion(let address, let length): "a window of \(length) bytes at \(address) is outside its region"
        case .bindExceedsRegionAccess: "a window cannot grant more access than its region"
        case .protectionDomainMismatch: "window and region are in different protection domains"
        case .keySpaceExhausted: "no 24-bit key index is left"
        case .device(let why): why
        case .connectionFailed(let why): "connection failed: \(why)"
        }
    }
}

/// The control path of a memory node's NIC: what the memory node does locally to serve
/// its pool (the verbs `ibv_alloc_pd`, `ibv_reg_mr`, `ibv_dereg_mr`, `ibv_alloc_mw`,
/// `ibv_bind_mw`, invalidation, connecting a queue pair, and moving queue pairs to the
/// error state). The simulated NIC and the verbs NIC implement it; the memory node
/// knows only this protocol.
///
/// ```swift
/// let pd = try nic.allocateProtectionDomain()
/// let region = try nic.registerRegion(pd: pd, address: nic.baseAddress, length: 4096, access: .all)
/// let connection = try nic.openConnection(from: NodeID(1001), protectionDomain: pd)
/// // Fencing the compute node: its QPs first, then its keys.
/// try nic.breakConnections(of: pd)
/// try nic.deregister(region)
/// ```
package protocol NICControl: AnyObject, Sendable {
    /// The memory node this NIC serves.
    var node: NodeID { get }
    /// The NIC address of the pool's first byte.
    var baseAddress: RemoteAddress { get }
    /// Bytes of the pool.
    var poolBytes: UInt64 { get }

    func allocateProtectionDomain() throws(NICControlError) -> ProtectionDomain
    /// Registers `[address, address+length)` with remote `access`. Regions are registered
    /// without relaxed ordering: the protocol relies on a WRITE being placed before a later
    /// atomic of the same QP.
    func registerRegion(pd: ProtectionDomain, address: RemoteAddress, length: UInt64, access: RemoteAccess) throws(NICControlError) -> MemoryRegion
    /// Deregisters a region; refused while windows are bound to it.
    func deregister(_ region: MemoryRegion) throws(NICControlError)
    func allocateWindow(pd: ProtectionDomain) throws(NICControlError) -> MemoryWindow
    /// Binds (or rebinds) a window over part of a region; the key's tag advances on every bind.
    func bind(_ window: MemoryWindow, in region: MemoryRegion, address: RemoteAddress, length: UInt64, access: RemoteAccess) throws(NICControlError) -> RKey
    /// Invalidates a window's binding: its key stops working at once.
    func invalidate(_ window: MemoryWindow) throws(NICControlError)
    /// Opens a reliable connection from `node`, in protection domain `pd`.
    func openConnection(from node: NodeID, protectionDomain pd: ProtectionDomain) throws(NICControlError) -> any FabricConnection
    /// Opens the memory node's own connection to its NIC (a loopback queue pair), through
    /// which it changes metadata words: never by CPU stores, which are not atomic against
    /// the NIC's atomics.
    func openLoopback(protectionDomain pd: ProtectionDomain) throws(NICControlError) -> any FabricConnection
    /// Moves every connection (queue pair) of protection domain `pd` to the error state,
    /// as `ibv_modify_qp` to `IBV_QPS_ERR` does: from the moment this returns, every verb
    /// on those connections fails with `FabricError.connectionBroken` and has no effect,
    /// including verbs posted before and still in flight (a dead compute node's posted
    /// work requests may otherwise execute after its death). A verb executing while this
    /// is called finishes first. Connections opened in `pd` later are not affected.
    /// Fencing a compute node starts here, before its keys are revoked.
    func breakConnections(of pd: ProtectionDomain) throws(NICControlError)
}
