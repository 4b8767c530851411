import Glibc

/// An owned, 64-byte-aligned, uninitialised array of `T` whose address never changes.
///
/// Allocation failure is an error (`outOfMemory`), never a trap.
public final class HeapBuffer<T>: @unchecked Sendable {
    public let pointer: UnsafeMutablePointer<T>
    public let count: Int

    public init(count: Int) throws(LoLDUError) {
        let (bytes, overflow) = max(count, 1).multipliedReportingOverflow(by: MemoryLayout<T>.stride)
        guard !overflow else { throw LoLDUError(.outOfMemory, "cannot allocate \(count) elements") }
        // Large buffers go on 2 MiB boundaries and ask for transparent huge pages: a 64 MiB
        // weight then costs 32 page faults instead of 16 384.
        let huge = bytes >= 4 << 20
        var raw: UnsafeMutableRawPointer?
        guard posix_memalign(&raw, huge ? 2 << 20 : 64, bytes) == 0, let raw else {
            throw LoLDUError(.outOfMemory, "out of memory allocating \(bytes) bytes")
        }
        if huge { _ = madvise(raw, bytes, MADV_HUGEPAGE) }
        pointer = raw.bindMemory(to: T.self, capacity: max(count, 1))
        self.count = count
    }

    /// A copy of `count` elements from `source`.
    public convenience init(copying source: UnsafePointer<T>, count: Int) throws(LoLDUError) {
        try self.init(count: count)
        pointer.update(from: source, count: count)
    }

    public convenience init(repeating value: T, count: Int) throws(LoLDUError) {
        try self.init(count: count)
        pointer.initialize(repeating: value, count: count)
    }

    /// `count` zeros (for the floating-point types: all bits clear, one `memset`).
    convenience init(zeros count: Int) throws(LoLDUError) where T: BinaryFloatingPoint {
        try self.init(count: count)
        pointer.zero(count: count)
    }

    deinit { free(pointer) }

    public var buffer: UnsafeMutableBufferPointer<T> { .init(start: pointer, count: count) }

    /// Element `i`, read while the buffer is alive (through ``pointer``, a temporary buffer may
    /// be freed before the read).
    subscript(i: Int) -> T { pointer[i] }

    /// The elements as an array.
    var array: [T] { Array(buffer) }
}

/// Checks that `count` × `bytesEach` bytes could be allocated now (allocated and released at
/// once) before work that builds Swift collections of about that size from outside data: their
/// allocation failure traps, so a lack of memory (an address-space limit) is an error here
/// instead (a size beyond `Int` too).
public func ensureRoom(_ count: Int, bytesEach: Int) throws(LoLDUError) {
    let (bytes, overflow) = count.multipliedReportingOverflow(by: bytesEach)
    guard !overflow else { throw LoLDUError(.outOfMemory, "cannot allocate \(count) × \(bytesEach) bytes") }
    _ = try HeapBuffer<UInt8>(count: bytes)
}

/// Scratch memory that grows on demand and is reused across calls (one per adapter).
struct Scratch<T> {
    private var storage: HeapBuffer<T>?

    /// A buffer of at least `count` elements; its contents are unspecified.
    mutating func get(_ count: Int) throws(LoLDUError) -> UnsafeMutablePointer<T> {
        if let storage, storage.count >= count { return storage.pointer }
        storage = nil
        let fresh = try HeapBuffer<T>(count: count)
        storage = fresh
        return fresh.pointer
    }

    var bytes: Int { (storage?.count ?? 0) * MemoryLayout<T>.stride }
}

extension UnsafeMutablePointer where Pointee: BinaryFloatingPoint {
    /// Sets `count` values to +0 (all bits clear) with one `memset`. In generic code,
    /// `update(repeating:)` copies element by element through the type's value witnesses.
    @inline(__always)
    func zero(count: Int) {
        _ = memset(self, 0, count * MemoryLayout<Pointee>.stride)
    }
}
