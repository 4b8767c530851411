import Glibc
import Synchronization

/// A pthread mutex (which ThreadSanitizer understands) over state the whole process shares: the
/// handle registry, the oneDNN primitive cache, the held checkpoint locks, the BLAS settings.
/// Made once per such state and never freed. Every one is held across `fork()`, as glibc holds
/// malloc's locks: the forking thread takes them all (in the order they were made) and releases
/// them in parent and child, so that a child forked while another thread held one does not find
/// it locked for ever. Code holding one never takes another, so that order cannot deadlock.
/// The same handlers count the forks a process descends from (``forks``), for what a child
/// cannot use as its parent did (an adapter's call lock, OpenMP's threads).
public final class ProcessMutex: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>

    public init() {
        mutex = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
        pthread_mutex_lock(Self.listMutex)
        Self.all.append(mutex)
        pthread_mutex_unlock(Self.listMutex)
    }

    public func withLock<R, Failure: Error>(_ body: () throws(Failure) -> R) throws(Failure) -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }

    /// How many forks this process descends from since the library first made a process mutex
    /// or called ``watchForks()`` (bumped in the child, where only the forking thread runs).
    static let forks = Atomic<UInt32>(0)

    /// Counts forks from now on (as making any process mutex does).
    static func watchForks() { _ = listMutex }

    /// Every mutex made, under ``listMutex``.
    nonisolated(unsafe) private static var all: [UnsafeMutablePointer<pthread_mutex_t>] = []
    /// Guards ``all``; held across fork() with them.
    nonisolated(unsafe) private static let listMutex: UnsafeMutablePointer<pthread_mutex_t> = {
        let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
        _ = ProcessMutex.forks.load(ordering: .relaxed)  // (made here, not first in a child)
        pthread_atfork(ProcessMutex.lockAll, ProcessMutex.unlockAll, ProcessMutex.child)
        return mutex
    }()

    private static let lockAll: @convention(c) () -> Void = {
        pthread_mutex_lock(ProcessMutex.listMutex)
        for mutex in ProcessMutex.all { pthread_mutex_lock(mutex) }
    }

    private static let unlockAll: @convention(c) () -> Void = {
        for mutex in ProcessMutex.all.reversed() { pthread_mutex_unlock(mutex) }
        pthread_mutex_unlock(ProcessMutex.listMutex)
    }

    private static let child: @convention(c) () -> Void = {
        ProcessMutex.forks.add(1, ordering: .relaxed)
        ProcessMutex.unlockAll()
    }
}
