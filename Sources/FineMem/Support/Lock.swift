#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A mutual-exclusion lock over `pthread_mutex_t`, heap-allocated so that its address is
/// stable. Swift-atomics is this module's atomics library, so `Synchronization.Mutex` is not
/// used (importing both makes `UInt64.AtomicRepresentation` ambiguous, see TOOLCHAIN.md).
///
/// The mutex has a cache line of its own (`cacheLineBytes`): locks allocated one after the
/// other would otherwise share lines, and tasks on two CPUs taking two different locks
/// would still pass a line back and forth.
package final class Lock: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>

    package init() {
        mutex = UnsafeMutableRawPointer.allocate(byteCount: cacheLineRounded(MemoryLayout<pthread_mutex_t>.stride), alignment: cacheLineBytes)
            .bindMemory(to: pthread_mutex_t.self, capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        let status = pthread_mutex_init(mutex, nil)
        precondition(status == 0, "pthread_mutex_init failed: \(status)")
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deinitialize(count: 1)
        UnsafeMutableRawPointer(mutex).deallocate()
    }

    @inline(__always)
    package func withLock<Result, Failure: Error>(_ body: () throws(Failure) -> Result) throws(Failure) -> Result {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }

    /// `withLock` for critical sections of a few dozen nanoseconds taken by tasks on
    /// several CPUs at once: a taken lock is tried again a few times before the thread
    /// parks in the kernel, where it would wait microseconds for a lock held for nanoseconds
    /// (the simulated NIC's per-connection lock: two tasks of one node posting at once
    /// otherwise fall into step, each parking on every other batch).
    @inline(__always)
    package func withLockSpinning<Result, Failure: Error>(_ body: () throws(Failure) -> Result) throws(Failure) -> Result {
        spinLock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }

    /// Tries before `withLockSpinning` parks.
    package static let spinsMax = 200
}

/// A value guarded by a `Lock`. The value lives behind a pointer of its own rather than in
/// a stored `var`: the lock already excludes concurrent access, and a class's stored `var`
/// would add the run time's dynamic exclusivity check to every access (a measurable share
/// of an allocation's CPU time).
package final class Locked<Value>: @unchecked Sendable {
    private let lock = Lock()
    private let value: UnsafeMutablePointer<Value>

    package init(_ value: Value) {
        self.value = UnsafeMutableRawPointer.allocate(byteCount: cacheLineRounded(MemoryLayout<Value>.stride), alignment: cacheLineBytes)
            .bindMemory(to: Value.self, capacity: 1)
        self.value.initialize(to: value)
    }

    deinit {
        value.deinitialize(count: 1)
        UnsafeMutableRawPointer(value).deallocate()
    }

    @inline(__always)
    package func withLock<Result, Failure: Error>(_ body: (inout Value) throws(Failure) -> Result) throws(Failure) -> Result {
        try lock.withLock { () throws(Failure) -> Result in try body(&value.pointee) }
    }
}

/// Values guarded by locks of their own, in stripes: stripe `i`'s mutex and value share a
/// cache-line-aligned slot that no other stripe touches, so tasks on different CPUs that
/// work in different stripes share neither a lock nor a cache line. No reference counting
/// on access (the slots are raw memory).
package final class LockedStripes<Value>: @unchecked Sendable {
    package let count: Int
    private let slots: UnsafeMutableRawPointer
    private let slotBytes: Int
    private let valueOffset = cacheLineRounded(MemoryLayout<pthread_mutex_t>.stride)

    /// `count` stripes, stripe `i` holding `make(i)`.
    package init(count: Int, _ make: (Int) -> Value) {
        precondition(count >= 1, "at least one stripe")
        self.count = count
        slotBytes = valueOffset + cacheLineRounded(MemoryLayout<Value>.stride)
        slots = .allocate(byteCount: slotBytes * count, alignment: cacheLineBytes)
        for index in 0..<count {
            let mutex = (slots + index * slotBytes).bindMemory(to: pthread_mutex_t.self, capacity: 1)
            mutex.initialize(to: pthread_mutex_t())
            let status = pthread_mutex_init(mutex, nil)
            precondition(status == 0, "pthread_mutex_init failed: \(status)")
            (slots + index * slotBytes + valueOffset).bindMemory(to: Value.self, capacity: 1).initialize(to: make(index))
        }
    }

    deinit {
        for index in 0..<count {
            pthread_mutex_destroy(mutex(index))
            value(index).deinitialize(count: 1)
        }
        slots.deallocate()
    }

    @inline(__always)
    private func mutex(_ index: Int) -> UnsafeMutablePointer<pthread_mutex_t> {
        (slots + index * slotBytes).assumingMemoryBound(to: pthread_mutex_t.self)
    }

    /// Stripe `index`'s value; only under its lock (or every lock, `withEveryLock`).
    @inline(__always)
    package func value(_ index: Int) -> UnsafeMutablePointer<Value> {
        (slots + index * slotBytes + valueOffset).assumingMemoryBound(to: Value.self)
    }

    /// Runs `body` on stripe `index`'s value, under its lock.
    @inline(__always)
    package func withLock<Result, Failure: Error>(_ index: Int, _ body: (inout Value) throws(Failure) -> Result) throws(Failure) -> Result {
        spinLock(mutex(index))
        defer { pthread_mutex_unlock(mutex(index)) }
        return try body(&value(index).pointee)
    }

    /// Runs `body` with every stripe locked (taken in index order, released in reverse).
    package func withEveryLock<Result>(_ body: () -> Result) -> Result {
        for index in 0..<count { pthread_mutex_lock(mutex(index)) }
        defer { for index in (0..<count).reversed() { pthread_mutex_unlock(mutex(index)) } }
        return body()
    }
}

/// Takes `mutex`, trying it `Lock.spinsMax` times before the thread parks.
@inline(__always)
func spinLock(_ mutex: UnsafeMutablePointer<pthread_mutex_t>) {
    var tries = 0
    while pthread_mutex_trylock(mutex) != 0 {
        tries += 1
        if tries == Lock.spinsMax {
            pthread_mutex_lock(mutex)
            return
        }
    }
}

/// The cache line size assumed for padding (x86-64 and most ARM cores).
let cacheLineBytes = 64

/// `bytes` rounded up to whole cache lines.
func cacheLineRounded(_ bytes: Int) -> Int { (max(bytes, 1) + cacheLineBytes - 1) / cacheLineBytes * cacheLineBytes }

/// Runs `check` in debug builds only: for invariant checks too costly for release, such as
/// walking a whole cache after every change. Cheap checks use `precondition` directly.
@inline(__always)
func debugOnly(_ check: () -> Void) {
    #if DEBUG
    check()
    #endif
}
