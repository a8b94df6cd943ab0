#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Where protocol code gets time and background work from: real threads and the monotonic
/// clock (`SystemRuntime`), or the deterministic `Simulator`.
package protocol Runtime: AnyObject, Sendable {
    /// Starts `body` as a new top-level task of this runtime.
    func spawn(_ body: @escaping @Sendable () async -> Void)
    /// Suspends the current task for `nanoseconds`.
    func sleep(nanoseconds: UInt64) async
    /// Monotonic time in nanoseconds.
    var nowNanoseconds: UInt64 { get }
    /// How many of its tasks run at the same time: the CPUs of real threads (at most 64),
    /// one in virtual time.
    var parallelism: Int { get }
}

/// Real threads and the monotonic clock.
package final class SystemRuntime: Runtime {
    package static let shared = SystemRuntime()

    package init() {}

    package func spawn(_ body: @escaping @Sendable () async -> Void) {
        Task.detached { await body() }
    }

    /// Pauses shorter than this are spent yielding the thread until the deadline: a timer
    /// would wake the task tens of microseconds late (the backoff starts at 500 ns).
    package static let yieldingPauseNanosMax: UInt64 = 20_000

    /// Longer pauses park the task on `DeadlineSleeper` (no heap allocation, unlike
    /// `Task.sleep`).
    package func sleep(nanoseconds: UInt64) async {
        let deadline = nowNanoseconds + nanoseconds
        guard nanoseconds <= Self.yieldingPauseNanosMax else {
            #if os(Linux)
            await DeadlineSleeper.shared.sleep(until: deadline)
            #else
            try? await Task.sleep(nanoseconds: nanoseconds)
            #endif
            return
        }
        repeat { await Task.yield() } while nowNanoseconds < deadline
    }

    package var nowNanoseconds: UInt64 { monotonicNanoseconds() }

    package let parallelism = min(64, max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))))
}

/// Exponential backoff on a runtime: each `sleep` waits the current delay, then doubles
/// it up to the range's upper bound. Every pause of the protocol between rounds of CASes
/// or waits for another task is one of these; the bound on the rounds is the caller's.
package struct Pause: Sendable {
    private var delay: UInt64
    private let longest: UInt64
    /// Pauses taken so far.
    package private(set) var count = 0

    package init(_ nanos: ClosedRange<UInt64>) {
        delay = nanos.lowerBound
        longest = nanos.upperBound
    }

    package mutating func sleep(on runtime: any Runtime) async {
        count += 1
        await runtime.sleep(nanoseconds: delay)
        delay = min(delay * 2, longest)
    }
}
