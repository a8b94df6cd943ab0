#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Where protocol code gets time and background work from: real threads and the monotonic
/// clock (`SystemRuntime`), or the deterministic `Simulator`.
public protocol Runtime: AnyObject, Sendable {
    /// Starts `body` as a new top-level task of this runtime.
    func spawn(_ body: @escaping @Sendable () async -> Void)
    /// Suspends the current task for `nanoseconds`.
    func sleep(nanoseconds: UInt64) async
    /// Monotonic time in nanoseconds.
    var nowNanoseconds: UInt64 { get }
}

/// Real threads and the monotonic clock.
public final class SystemRuntime: Runtime {
    public static let shared = SystemRuntime()

    public init() {}

    public func spawn(_ body: @escaping @Sendable () async -> Void) {
        Task.detached { await body() }
    }

    public func sleep(nanoseconds: UInt64) async {
        try? await Task.sleep(nanoseconds: nanoseconds)
    }

    public var nowNanoseconds: UInt64 {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
    }
}
