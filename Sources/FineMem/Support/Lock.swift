#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A mutual-exclusion lock over `pthread_mutex_t`, heap-allocated so that its address is
/// stable. Swift-atomics is this module's atomics library, so `Synchronization.Mutex` is not
/// used (importing both makes `UInt64.AtomicRepresentation` ambiguous, see TOOLCHAIN.md).
final class Lock: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>

    init() {
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        let status = pthread_mutex_init(mutex, nil)
        precondition(status == 0, "pthread_mutex_init failed: \(status)")
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    @inline(__always)
    func withLock<Result, Failure: Error>(_ body: () throws(Failure) -> Result) throws(Failure) -> Result {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }
}

/// A value guarded by a `Lock`. The value lives behind a pointer of its own rather than in
/// a stored `var`: the lock already excludes concurrent access, and a class's stored `var`
/// would add the run time's dynamic exclusivity check to every access (a measurable share
/// of an allocation's CPU time).
final class Locked<Value>: @unchecked Sendable {
    private let lock = Lock()
    private let value: UnsafeMutablePointer<Value>

    init(_ value: Value) {
        self.value = .allocate(capacity: 1)
        self.value.initialize(to: value)
    }

    deinit {
        value.deinitialize(count: 1)
        value.deallocate()
    }

    @inline(__always)
    func withLock<Result, Failure: Error>(_ body: (inout Value) throws(Failure) -> Result) throws(Failure) -> Result {
        try lock.withLock { () throws(Failure) -> Result in try body(&value.pointee) }
    }
}

/// Runs `check` in debug builds only: for invariant checks too costly for release, such as
/// walking a whole cache after every change. Cheap checks use `precondition` directly.
@inline(__always)
func debugOnly(_ check: () -> Void) {
    #if DEBUG
    check()
    #endif
}
