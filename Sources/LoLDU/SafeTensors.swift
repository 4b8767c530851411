/// The safetensors format (huggingface/safetensors): an 8-byte little-endian header length `N`,
/// `N` bytes of JSON — per tensor `{"dtype", "shape", "data_offsets": [begin, end]}` relative to
/// the data section, plus an optional `"__metadata__"` map of strings — then the data.
///
/// The reader checks everything before trusting it: the header length against the file size,
/// the JSON, every dtype, shape and offset, and that the tensors tile the data section exactly
/// (no gap, no overlap, no trailing bytes), as the reference implementation requires.
import Glibc

public enum SafeTensors {
    /// Element types and their sizes in bytes.
    public static let dtypeSizes: [String: Int] = [
        "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
        "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8,
    ]

    /// The largest header accepted (as the reference implementation: 100 MB).
    public static let maxHeader = 100_000_000

    public static func name(of dtype: DType) -> String {
        switch dtype {
        case .float32: "F32"
        case .float64: "F64"
        case .bfloat16: "BF16"
        case .float16: "F16"
        }
    }

    /// The library's element type stored as safetensors dtype `name`, if any.
    public static func dtype(named name: String) -> DType? { DType.allCases.first { self.name(of: $0) == name } }

    public struct Tensor: Sendable {
        public let dtype: String
        public let shape: [Int]
        /// Byte range in the file.
        public let range: Range<Int>
    }

    /// A parsed file: its bytes (read, or mapped) and the validated header.
    public struct File: Sendable {
        public let bytes: Bytes
        /// Tensors in the order of their data.
        public let order: [String]
        public let tensors: [String: Tensor]
        public let metadata: [String: String]
        public let what: String

        public func fail(_ message: String) -> LoLDUError { LoLDUError(.format, "\(what): \(message)") }

        /// The bytes of a tensor of this file.
        public func data(_ tensor: Tensor) -> UnsafeRawBufferPointer {
            UnsafeRawBufferPointer(rebasing: bytes.buffer[tensor.range])
        }

        /// The named tensor, which must have this dtype and shape.
        public func tensor(_ name: String, dtype: String, shape: [Int]) throws(LoLDUError) -> Tensor {
            guard let t = tensors[name] else { throw fail("missing tensor \"\(name)\"") }
            guard t.dtype == dtype else { throw fail("tensor \"\(name)\" has dtype \(t.dtype), expected \(dtype)") }
            guard t.shape == shape else { throw fail("tensor \"\(name)\" has shape \(t.shape), expected \(shape)") }
            return t
        }

        /// The values of an F32 or F64 tensor, converted to `T`; every value must be finite.
        public func values<T: BLASScalar>(_ name: String, shape: [Int], as _: T.Type) throws(LoLDUError) -> [T] {
            let t = try tensor(name, dtype: SafeTensors.name(of: T.dtype), shape: shape)
            let count = shape.reduce(1, *)
            let raw = bytes.buffer
            let values = (0..<count).map { raw.loadUnaligned(fromByteOffset: t.range.lowerBound + $0 * MemoryLayout<T>.size, as: T.self) }
            if let bad = values.firstIndex(where: { !$0.isFinite }) {
                throw fail("tensor \"\(name)\" element \(bad) is \(values[bad]); every value must be finite")
            }
            return values
        }
    }

    /// Parses and validates a whole file; `what` names it in error messages.
    public static func parse(_ bytes: [UInt8], what: String) throws(LoLDUError) -> File {
        try parse(Bytes(copying: bytes), what: what)
    }

    /// Maps a file (read-only) and parses it: only the header is read now, tensors as they are
    /// used, so a model's weights cost their pages, not a copy.
    public static func map(_ path: String) throws(LoLDUError) -> File {
        try parse(try Bytes(mapping: path), what: path)
    }

    /// Parses and validates the file in `storage`.
    public static func parse(_ storage: Bytes, what: String) throws(LoLDUError) -> File {
        func fail(_ message: String) -> LoLDUError { LoLDUError(.format, "\(what): \(message)") }
        let bytes = storage.buffer
        guard bytes.count >= 8 else {
            throw fail("truncated: \(bytes.count) bytes, but a safetensors file starts with an 8-byte header length")
        }
        var length: UInt64 = 0
        for i in 0..<8 { length |= UInt64(bytes[i]) << (8 * UInt64(i)) }
        guard length <= UInt64(bytes.count - 8) else {
            throw fail("header length \(length) runs past the end of the file (\(bytes.count) bytes)")
        }
        guard length <= UInt64(maxHeader) else { throw fail("header length \(length) exceeds \(maxHeader)") }
        let headerEnd = 8 + Int(length)
        let header = try rethrowing {
            try JSON.parse(UnsafeRawBufferPointer(rebasing: bytes[8..<headerEnd]), what: "\(what) header")
        }
        guard let members = header.object else { throw fail("the header is not a JSON object") }
        let dataLength = bytes.count - headerEnd

        var metadata: [String: String] = [:]
        var tensors: [String: Tensor] = [:]
        var spans: [(begin: Int, end: Int, name: String)] = []
        for (name, entry) in members {
            guard !name.containsControlCharacter else { throw fail("a tensor name contains a control character") }
            if name == "__metadata__" {
                guard let map = entry.object else { throw fail("__metadata__ is not an object") }
                for (key, value) in map {
                    guard let text = value.string else { throw fail("__metadata__[\"\(key)\"] is not a string") }
                    metadata[key] = text
                }
                continue
            }
            guard let fields = entry.object else { throw fail("entry \"\(name)\" is not an object") }
            guard let dtype = fields["dtype"]?.string, let size = dtypeSizes[dtype] else {
                throw fail("tensor \"\(name)\" has a missing or unknown dtype")
            }
            guard let dims = fields["shape"]?.array else { throw fail("tensor \"\(name)\" has no shape") }
            var shape: [Int] = []
            var elements = 1
            for dim in dims {
                guard let d = dim.int, d >= 0 else { throw fail("tensor \"\(name)\" has a bad dimension in its shape") }
                let (product, overflow) = elements.multipliedReportingOverflow(by: d)
                guard !overflow, product <= dataLength else { throw fail("tensor \"\(name)\" is larger than the file") }
                elements = product
                shape.append(d)
            }
            guard let offsets = fields["data_offsets"]?.array, offsets.count == 2,
                  let begin = offsets[0].int, let end = offsets[1].int,
                  begin >= 0, begin <= end, end <= dataLength
            else {
                throw fail("tensor \"\(name)\" has data_offsets outside the data section (\(dataLength) bytes)")
            }
            guard end - begin == elements * size else {
                throw fail("tensor \"\(name)\": shape \(shape) of \(dtype) needs \(elements * size) bytes, data_offsets give \(end - begin)")
            }
            tensors[name] = Tensor(dtype: dtype, shape: shape, range: (headerEnd + begin)..<(headerEnd + end))
            spans.append((begin, end, name))
        }
        spans.sort { ($0.begin, $0.end) < ($1.begin, $1.end) }
        var next = 0
        for span in spans {
            guard span.begin == next else {
                throw fail(span.begin < next ? "tensor \"\(span.name)\" overlaps another" : "gap in the data before tensor \"\(span.name)\"")
            }
            next = span.end
        }
        guard next == dataLength else { throw fail("\(dataLength - next) bytes of data belong to no tensor") }
        return File(bytes: storage, order: spans.map(\.name), tensors: tensors, metadata: metadata, what: what)
    }

    /// The bytes of a file: a copy in memory, or a read-only mapping of the file.
    public final class Bytes: @unchecked Sendable {
        public let buffer: UnsafeRawBufferPointer
        private let mapped: Bool

        init(copying bytes: [UInt8]) {
            let memory = UnsafeMutableRawBufferPointer.allocate(byteCount: Swift.max(bytes.count, 1), alignment: 64)
            bytes.withUnsafeBytes { memory.copyMemory(from: $0) }
            buffer = UnsafeRawBufferPointer(rebasing: memory[0..<bytes.count])
            mapped = false
        }

        /// Maps a regular file; refuses anything else (see ``AtomicFile``).
        init(mapping path: String) throws(LoLDUError) {
            guard let (fd, size) = try AtomicFile.openRegular(path) else { throw AtomicFile.failure("cannot open", path) }
            defer { close(fd) }
            guard size > 0 else {
                buffer = UnsafeRawBufferPointer(start: nil, count: 0)
                mapped = false
                return
            }
            guard let base = mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0), base != MAP_FAILED else {
                throw AtomicFile.failure("cannot map", path)
            }
            buffer = UnsafeRawBufferPointer(start: base, count: size)
            mapped = true
        }

        deinit {
            guard let base = buffer.baseAddress else { return }
            if mapped { munmap(UnsafeMutableRawPointer(mutating: base), buffer.count) } else { base.deallocate() }
        }
    }

    /// One tensor to write: its bytes are produced by `fill` into a buffer of `byteCount` bytes.
    public struct Entry {
        public let name: String
        public let dtype: String
        public let shape: [Int]
        public let fill: (UnsafeMutableRawBufferPointer) throws(LoLDUError) -> Void

        public init(name: String, dtype: String, shape: [Int], fill: @escaping (UnsafeMutableRawBufferPointer) throws(LoLDUError) -> Void) {
            self.name = name
            self.dtype = dtype
            self.shape = shape
            self.fill = fill
        }

        public var byteCount: Int { shape.reduce(1, *) * (SafeTensors.dtypeSizes[dtype] ?? 0) }
    }

    /// Writes a file atomically: header, then each tensor in order (one buffer at a time).
    public static func write(_ entries: [Entry], metadata: [String: String], to path: String) throws(LoLDUError) {
        try AtomicFile.write(to: path) { file throws(LoLDUError) in try write(entries, metadata: metadata, to: file) }
    }

    /// Writes the file's bytes through `file`.
    public static func write(_ entries: [Entry], metadata: [String: String], to file: AtomicFile.Writer) throws(LoLDUError) {
        var members: [(String, JSON)] = [("__metadata__", .object(metadata.mapValues { .string($0) }))]
        var offset = 0
        for entry in entries {
            let end = offset + entry.byteCount
            members.append((entry.name, .object([
                "dtype": .string(entry.dtype),
                "shape": .array(entry.shape.map { JSON.number($0) }),
                "data_offsets": .array([JSON.number(offset), JSON.number(end)]),
            ])))
            offset = end
        }
        var header = Array(JSON.text(members).utf8)
        while header.count % 8 != 0 { header.append(0x20) }  // data starts 8-byte aligned
        var length = [UInt8](repeating: 0, count: 8)
        for i in 0..<8 { length[i] = UInt8(truncatingIfNeeded: UInt64(header.count) >> (8 * UInt64(i))) }
        try file.write(length)
        try file.write(header)
        for entry in entries {
            let buffer = try HeapBuffer<UInt8>(count: entry.byteCount)
            let body = UnsafeMutableRawBufferPointer(start: buffer.pointer, count: entry.byteCount)
            try entry.fill(body)
            try file.write(UnsafeRawBufferPointer(body))
        }
    }
}
