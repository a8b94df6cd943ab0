import CVerbs
#if canImport(Glibc)
import Glibc
#endif

/// A failed bootstrap step: which step, and why.
package struct VerbsBootstrapError: Error, Sendable, Hashable, CustomStringConvertible {
    package let step: String
    package let reason: String
    package var description: String { "bootstrap: \(step): \(reason)" }

    static func errno(_ step: String, _ code: Int32 = finemem_errno()) -> VerbsBootstrapError {
        VerbsBootstrapError(step: step, reason: "\(String(cString: strerror(code))) (errno \(code))")
    }
}

/// What each side sends once over the bootstrap socket: its queue pair (number, LID, GID,
/// first PSN) and an opaque payload (the memory node's grant: address, geometry, keys).
///
/// Wire format, little-endian: `"FMV1"`, QP number (4), LID (2), GID (16), PSN (4),
/// payload length (4), payload.
package struct VerbsBootstrapMessage: Sendable, Hashable {
    package var endpoint: VerbsEndpoint
    package var payload: [UInt8]

    package init(endpoint: VerbsEndpoint, payload: [UInt8]) {
        self.endpoint = endpoint
        self.payload = payload
    }

    static let magic: [UInt8] = Array("FMV1".utf8)
    static let headerBytes = 4 + 4 + 2 + 16 + 4 + 4

    package var encoded: [UInt8] {
        var bytes = Self.magic
        func put<T: FixedWidthInteger>(_ value: T) { withUnsafeBytes(of: value.littleEndian) { bytes += $0 } }
        put(endpoint.queuePairNumber)
        put(endpoint.lid)
        bytes += endpoint.gid.count == 16 ? endpoint.gid : Array(repeating: 0, count: 16)
        put(endpoint.packetSequenceNumber)
        put(UInt32(payload.count))
        return bytes + payload
    }

    /// Decodes the header; answers the message without payload and the payload length.
    static func decodeHeader(_ bytes: [UInt8]) -> (VerbsEndpoint, Int)? {
        guard bytes.count == headerBytes, Array(bytes[0..<4]) == magic else { return nil }
        func get<T: FixedWidthInteger>(_ offset: Int, _: T.Type) -> T {
            var value: T = 0
            for i in 0..<MemoryLayout<T>.size { value |= T(bytes[offset + i]) << (8 * i) }
            return value
        }
        let endpoint = VerbsEndpoint(
            queuePairNumber: get(4, UInt32.self), lid: get(8, UInt16.self), gid: Array(bytes[10..<26]),
            packetSequenceNumber: get(26, UInt32.self))
        return (endpoint, Int(get(30, UInt32.self)))
    }
}

/// One TCP connection of the bootstrap.
package final class VerbsBootstrapChannel: @unchecked Sendable {
    private let socket: Int32
    /// Whether the socket is IPv6 (not IPv4-mapped): the GID is then an IPv6 one.
    package let isIPv6: Bool

    init(socket: Int32, isIPv6: Bool) {
        self.socket = socket
        self.isIPv6 = isIPv6
    }

    deinit { close(socket) }

    private func wait(_ events: Int16, until deadline: UInt64, step: String) throws(VerbsBootstrapError) {
        while true {
            let now = SystemRuntime.shared.nowNanoseconds
            guard now < deadline else { throw VerbsBootstrapError(step: step, reason: "timed out") }
            var fd = pollfd(fd: socket, events: events, revents: 0)
            let ready = poll(&fd, 1, Int32(min((deadline - now) / 1_000_000 + 1, 60_000)))
            if ready > 0 { return }
            if ready < 0, finemem_errno() != EINTR { throw .errno(step) }
        }
    }

    package func send(_ message: VerbsBootstrapMessage, timeoutSeconds: Double = 10, step: String) throws(VerbsBootstrapError) {
        let bytes = message.encoded
        let deadline = SystemRuntime.shared.nowNanoseconds + UInt64(timeoutSeconds * 1e9)
        var sent = 0
        while sent < bytes.count {
            try wait(Int16(POLLOUT), until: deadline, step: step)
            let n = bytes[sent...].withUnsafeBytes { Glibc.send(socket, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n < 0 {
                if finemem_errno() == EINTR || finemem_errno() == EAGAIN { continue }
                throw .errno(step)
            }
            sent += n
        }
    }

    private func receive(count: Int, until deadline: UInt64, step: String) throws(VerbsBootstrapError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var received = 0
        while received < count {
            try wait(Int16(POLLIN), until: deadline, step: step)
            let n = bytes.withUnsafeMutableBytes { recv(socket, $0.baseAddress! + received, count - received, 0) }
            if n == 0 { throw VerbsBootstrapError(step: step, reason: "the peer closed the connection after \(received) of \(count) bytes") }
            if n < 0 {
                if finemem_errno() == EINTR || finemem_errno() == EAGAIN { continue }
                throw .errno(step)
            }
            received += n
        }
        return bytes
    }

    package func receive(timeoutSeconds: Double = 10, step: String) throws(VerbsBootstrapError) -> VerbsBootstrapMessage {
        let deadline = SystemRuntime.shared.nowNanoseconds + UInt64(timeoutSeconds * 1e9)
        let header = try receive(count: VerbsBootstrapMessage.headerBytes, until: deadline, step: step)
        guard let (endpoint, length) = VerbsBootstrapMessage.decodeHeader(header), length <= 1 << 20 else {
            throw VerbsBootstrapError(step: step, reason: "not a FineMem bootstrap message")
        }
        let payload = try receive(count: length, until: deadline, step: step + " (payload)")
        return VerbsBootstrapMessage(endpoint: endpoint, payload: payload)
    }
}

/// A listening bootstrap socket of a memory node.
package final class VerbsBootstrapListener: @unchecked Sendable {
    private let socket: Int32
    package let port: UInt16
    private let isIPv6: Bool

    /// Listens on `host` (an IPv4 or IPv6 literal) and `port` (0: any free port).
    package init(host: String = "127.0.0.1", port: UInt16 = 0) throws(VerbsBootstrapError) {
        var storage = sockaddr_storage()
        let family = try verbsSocketAddress(host: host, port: port, into: &storage)
        let fd = Glibc.socket(family, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw .errno("socket for listening on \(host):\(port)") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        let length = socklen_t(family == AF_INET6 ? MemoryLayout<sockaddr_in6>.size : MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafePointer(to: &storage) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) } }
        guard bound == 0, listen(fd, 16) == 0 else {
            let error = VerbsBootstrapError.errno("bind/listen on \(host):\(port)")
            close(fd)
            throw error
        }
        var actual = sockaddr_storage()
        var actualLength = socklen_t(MemoryLayout<sockaddr_storage>.size)
        _ = withUnsafeMutablePointer(to: &actual) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &actualLength) } }
        let rawPort = withUnsafePointer(to: &actual) { pointer in
            family == AF_INET6
                ? pointer.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { $0.pointee.sin6_port }
                : pointer.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { $0.pointee.sin_port }
        }
        socket = fd
        self.port = UInt16(bigEndian: rawPort)
        isIPv6 = family == AF_INET6
    }

    deinit { close(socket) }

    /// Waits up to `timeoutSeconds` for a compute node to connect.
    package func accept(timeoutSeconds: Double = 10) throws(VerbsBootstrapError) -> VerbsBootstrapChannel {
        var fd = pollfd(fd: socket, events: Int16(POLLIN), revents: 0)
        let ready = poll(&fd, 1, Int32(timeoutSeconds * 1000))
        guard ready > 0 else {
            throw ready == 0 ? VerbsBootstrapError(step: "accept on port \(port)", reason: "no compute node connected within \(timeoutSeconds) s") : .errno("accept on port \(port)")
        }
        let client = Glibc.accept(socket, nil, nil)
        guard client >= 0 else { throw .errno("accept on port \(port)") }
        return VerbsBootstrapChannel(socket: client, isIPv6: isIPv6)
    }
}

/// Connects to a memory node's bootstrap listener at `host`:`port`.
package func verbsBootstrapConnect(host: String, port: UInt16, timeoutSeconds: Double = 10) throws(VerbsBootstrapError) -> VerbsBootstrapChannel {
    var storage = sockaddr_storage()
    let family = try verbsSocketAddress(host: host, port: port, into: &storage)
    let fd = socket(family, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { throw .errno("socket for \(host):\(port)") }
    let flags = fcntl(fd, F_GETFL, 0)
    _ = fcntl(fd, F_SETFL, flags | O_NONBLOCK)
    let length = socklen_t(family == AF_INET6 ? MemoryLayout<sockaddr_in6>.size : MemoryLayout<sockaddr_in>.size)
    let status = withUnsafePointer(to: &storage) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, length) } }
    if status != 0 {
        guard finemem_errno() == EINPROGRESS else {
            let error = VerbsBootstrapError.errno("connect to \(host):\(port)")
            close(fd)
            throw error
        }
        var pfd = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
        let ready = poll(&pfd, 1, Int32(timeoutSeconds * 1000))
        var soError: Int32 = 0
        var soLength = socklen_t(MemoryLayout<Int32>.size)
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &soError, &soLength)
        guard ready > 0, soError == 0 else {
            close(fd)
            throw ready == 0
                ? VerbsBootstrapError(step: "connect to \(host):\(port)", reason: "timed out after \(timeoutSeconds) s")
                : .errno("connect to \(host):\(port)", soError)
        }
    }
    return VerbsBootstrapChannel(socket: fd, isIPv6: family == AF_INET6)
}

/// Fills `storage` with the numeric address `host` and `port`; answers the family.
private func verbsSocketAddress(host: String, port: UInt16, into storage: inout sockaddr_storage) throws(VerbsBootstrapError) -> Int32 {
    var v4 = in_addr()
    if inet_pton(AF_INET, host, &v4) == 1 {
        withUnsafeMutablePointer(to: &storage) { pointer in
            pointer.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { address in
                address.pointee.sin_family = sa_family_t(AF_INET)
                address.pointee.sin_port = port.bigEndian
                address.pointee.sin_addr = v4
            }
        }
        return AF_INET
    }
    var v6 = in6_addr()
    if inet_pton(AF_INET6, host, &v6) == 1 {
        withUnsafeMutablePointer(to: &storage) { pointer in
            pointer.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { address in
                address.pointee.sin6_family = sa_family_t(AF_INET6)
                address.pointee.sin6_port = port.bigEndian
                address.pointee.sin6_addr = v6
            }
        }
        return AF_INET6
    }
    throw VerbsBootstrapError(step: "address \(host)", reason: "not an IPv4 or IPv6 address")
}

extension VerbsConnection {
    /// The compute node's side of the bootstrap: creates a QP (in a protection domain of
    /// its own on `context`), sends its endpoint, receives the memory node's endpoint and
    /// payload (the grant), and connects (RESET -> INIT -> RTR -> RTS). The GID follows the
    /// bootstrap socket's address family.
    package static func bootstrap(
        context: VerbsContext, channel: VerbsBootstrapChannel, remoteNode: NodeID, timeoutSeconds: Double = 10,
        completionTimeoutSeconds: Double = 60
    ) throws(VerbsBootstrapError) -> (VerbsConnection, payload: [UInt8]) {
        let path: VerbsPath
        let qp: VerbsQueuePair
        let pd: VerbsProtectionDomain
        do {
            path = try VerbsPath.choose(context: context, preferIPv6: channel.isIPv6)
            pd = try VerbsProtectionDomain(context: context)
            let cq = try VerbsCompletionQueue(context: context, entries: 256)
            qp = try VerbsQueuePair(pd: pd, cq: cq, sendQueueDepth: 128)
        } catch { throw VerbsBootstrapError(step: "create the compute node's queue pair", reason: "\(error)") }
        let psn = UInt32.random(in: 0..<(1 << 24))
        try channel.send(VerbsBootstrapMessage(endpoint: qp.endpoint(path: path, packetSequenceNumber: psn), payload: []), timeoutSeconds: timeoutSeconds, step: "send the compute node's QP number, LID, GID and PSN")
        let answer = try channel.receive(timeoutSeconds: timeoutSeconds, step: "receive the memory node's QP number, LID, GID, PSN and grant")
        guard answer.endpoint.queuePairNumber != 0 else {
            throw VerbsBootstrapError(step: "memory node", reason: String(decoding: answer.payload, as: UTF8.self))
        }
        do {
            try qp.connect(to: answer.endpoint, path: path, localPSN: psn)
            let connection = try VerbsConnection(remoteNode: remoteNode, queuePair: qp, peer: nil, completionTimeoutSeconds: completionTimeoutSeconds)
            return (connection, answer.payload)
        } catch { throw VerbsBootstrapError(step: "connect the queue pair (RESET->INIT->RTR->RTS)", reason: "\(error)") }
    }
}

extension VerbsNIC {
    /// The memory node's side of the bootstrap for one compute node: receives its endpoint,
    /// connects a responder QP in `pd`, and sends back this side's endpoint with `payload`
    /// (the grant). On failure the compute node is sent the reason (QP number 0).
    package func serveBootstrap(
        _ channel: VerbsBootstrapChannel, protectionDomain pd: ProtectionDomain, payload: [UInt8], timeoutSeconds: Double = 10
    ) throws(VerbsBootstrapError) {
        let request = try channel.receive(timeoutSeconds: timeoutSeconds, step: "receive the compute node's QP number, LID, GID and PSN")
        let local: VerbsEndpoint
        do {
            (local, _) = try acceptRemote(request.endpoint, protectionDomain: pd)
        } catch {
            let refusal = VerbsBootstrapMessage(endpoint: VerbsEndpoint(queuePairNumber: 0, lid: 0, gid: [], packetSequenceNumber: 0), payload: Array("\(error)".utf8))
            try? channel.send(refusal, timeoutSeconds: timeoutSeconds, step: "send the refusal")
            throw VerbsBootstrapError(step: "connect the memory node's queue pair", reason: "\(error)")
        }
        try channel.send(VerbsBootstrapMessage(endpoint: local, payload: payload), timeoutSeconds: timeoutSeconds, step: "send the memory node's QP number, LID, GID, PSN and grant")
    }
}
