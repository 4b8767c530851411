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
    static let dtypeSizes: [String: Int] = [
        "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
        "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8,
    ]

    /// The largest header accepted (as the reference implementation: 100 MB).
    static let maxHeader = 100_000_000

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

    /// The number of elements of `shape`: 0 when a dimension is 0, whatever the others are
    /// (`[2⁴⁰, 2⁴⁰, 0]` is a valid empty tensor); nil when the product overflows.
    static func elements(of shape: [Int]) -> Int? {
        if shape.contains(0) { return 0 }
        var product = 1
        for d in shape {
            let (next, overflow) = product.multipliedReportingOverflow(by: d)
            if overflow { return nil }
            product = next
        }
        return product
    }

    public struct Tensor: Sendable {
        public let dtype: String
        public let shape: [Int]
        /// The number of elements (see ``SafeTensors/elements(of:)``).
        public let count: Int
        /// Byte range in the file.
        public let range: Range<Int>
    }

    /// A parsed file: its bytes (read whole, or an open file read on demand) and the validated
    /// header.
    public struct File: Sendable {
        let source: any ByteSource
        /// Tensors in the order of their data.
        public let order: [String]
        public let tensors: [String: Tensor]
        public let metadata: [String: String]
        public let what: String

        func fail(_ message: String) -> LoLDUError { LoLDUError(.format, "\(what): \(message)") }

        /// Copies the bytes of a tensor of this file to `destination` (`tensor.range.count` bytes).
        func read(_ tensor: Tensor, into destination: UnsafeMutableRawPointer) throws(LoLDUError) {
            try source.read(tensor.range, into: destination)
        }

        /// The values of `tensor` (of element type `dtype`) converted to `type`, in a new buffer:
        /// read into it directly when the types are the same.
        func read(_ tensor: Tensor, as dtype: DType, to type: DType) throws(LoLDUError) -> HeapBuffer<UInt8> {
            let values = try HeapBuffer<UInt8>(count: tensor.range.count / dtype.byteSize * type.byteSize)
            try read(tensor, into: values.pointer, as: dtype, to: type)
            return values
        }

        /// The values of `tensor` (of element type `dtype`) converted to `type` into
        /// `destination`: read into it directly when the types are the same. A finite value
        /// beyond the range of `type` is refused (`notFinite`, naming `what`).
        func read(_ tensor: Tensor, into destination: UnsafeMutableRawPointer, as dtype: DType, to type: DType,
                         what: String = "") throws(LoLDUError) {
            guard dtype != type else { return try read(tensor, into: destination) }
            try forEachRawPiece(of: tensor, size: dtype.byteSize) { raw, first, n throws(LoLDUError) in
                try convertElementsInRange(raw, dtype, destination + first * type.byteSize, type, count: n,
                                           what: what.isEmpty ? self.what : what, first: first)
            }
        }

        /// The bytes of `tensor` (of element type `dtype`, or raw bytes when nil) converted to
        /// `type` (nil: as they are) in pieces of at most 8 MiB of the file, each passed to
        /// `body`: the memory of one piece, whatever the tensor's size. A finite value beyond the
        /// range of `type` is refused (`notFinite`, naming `what`).
        func forEachPiece(of tensor: Tensor, as dtype: DType?, to type: DType?, what: String,
                          _ body: (UnsafeRawBufferPointer) throws(LoLDUError) -> Void) throws(LoLDUError) {
            let size = dtype?.byteSize ?? 1
            guard let dtype, let type, dtype != type else {
                return try forEachRawPiece(of: tensor, size: size) { raw, _, n throws(LoLDUError) in
                    try body(UnsafeRawBufferPointer(start: raw, count: n * size))
                }
            }
            var converted: HeapBuffer<UInt8>? = nil  // (sized by the first piece, the largest)
            try forEachRawPiece(of: tensor, size: size) { raw, first, n throws(LoLDUError) in
                if converted == nil { converted = try HeapBuffer<UInt8>(count: n * type.byteSize) }
                let into = converted!
                try convertElementsInRange(raw, dtype, into.pointer, type, count: n, what: what, first: first)
                try body(UnsafeRawBufferPointer(start: into.pointer, count: n * type.byteSize))
            }
        }

        /// `tensor`'s bytes read in pieces of at most `pieceBytes` (whole elements of `size`
        /// bytes) into one buffer: `body(piece, its first element, its element count)`.
        private func forEachRawPiece(of tensor: Tensor, size: Int, pieceBytes: Int = 8 << 20,
                                     _ body: (UnsafeRawPointer, Int, Int) throws(LoLDUError) -> Void) throws(LoLDUError) {
            let count = tensor.range.count / size, step = max(1, pieceBytes / size)
            let raw = try HeapBuffer<UInt8>(count: min(count, step) * size)
            var first = 0
            while first < count {
                let n = min(step, count - first)
                let begin = tensor.range.lowerBound + first * size
                try source.read(begin..<(begin + n * size), into: raw.pointer)
                try body(UnsafeRawPointer(raw.pointer), first, n)
                first += n
            }
        }

        /// The named tensor, which must have this dtype and shape.
        public func tensor(_ name: String, dtype: String, shape: [Int]) throws(LoLDUError) -> Tensor {
            guard let t = tensors[name] else { throw fail("missing tensor \"\(name)\"") }
            guard t.dtype == dtype else { throw fail("tensor \"\(name)\" has dtype \(t.dtype), expected \(dtype)") }
            guard t.shape == shape else { throw fail("tensor \"\(name)\" has shape \(t.shape), expected \(shape)") }
            return t
        }

        /// The values of a tensor of element type `dtype` (float32 or float64), as doubles (exact),
        /// in a buffer whose allocation may fail (its size comes from the file); every value must
        /// be finite.
        public func values(_ name: String, shape: [Int], as dtype: DType) throws(LoLDUError) -> HeapBuffer<Double> {
            let t = try tensor(name, dtype: SafeTensors.name(of: dtype), shape: shape)
            let values = try HeapBuffer<Double>(count: shape.reduce(1, *))  // (the shape of a parsed tensor)
            try read(t, into: values.pointer, as: dtype, to: .float64)
            if let bad = values.buffer.firstIndex(where: { !$0.isFinite }) {
                throw fail("tensor \"\(name)\" element \(bad) is \(values.pointer[bad]); every value must be finite")
            }
            return values
        }
    }

    /// Parses and validates a whole file; `what` names it in error messages.
    public static func parse(_ bytes: [UInt8], what: String) throws(LoLDUError) -> File {
        try parse(try rethrowing { try bytes.withUnsafeBytes { raw in try FileBytes(copying: raw) } }, what: what)
    }

    /// Opens a file and parses it: only the header is read now, tensors when they are read, so
    /// a model's weights cost one tensor at a time, not a copy.
    static func open(_ path: String) throws(LoLDUError) -> File {
        try parse(try OpenFile(path), what: path)
    }

    /// Parses and validates the file in `source`.
    static func parse(_ source: any ByteSource, what: String) throws(LoLDUError) -> File {
        func fail(_ message: String) -> LoLDUError { LoLDUError(.format, "\(what): \(message)") }
        let size = source.count
        guard size >= 8 else {
            throw fail("truncated: \(size) bytes, but a safetensors file starts with an 8-byte header length")
        }
        var prefix: UInt64 = 0
        try source.read(0..<8, into: &prefix)
        let length = UInt64(littleEndian: prefix)
        guard length <= UInt64(size - 8) else {
            throw fail("header length \(length) runs past the end of the file (\(size) bytes)")
        }
        guard length <= UInt64(maxHeader) else { throw fail("header length \(length) exceeds \(maxHeader)") }
        let headerEnd = 8 + Int(length)
        let headerBytes = try HeapBuffer<UInt8>(count: Int(length))
        try source.read(8..<headerEnd, into: headerBytes.pointer)
        let header = try JSON.parse(UnsafeRawBufferPointer(start: headerBytes.pointer, count: Int(length)), what: "\(what) header")
        guard let members = header.object else { throw fail("the header is not a JSON object") }
        let dataLength = size - headerEnd

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
            for dim in dims {
                guard let d = dim.int, d >= 0 else { throw fail("tensor \"\(name)\" has a bad dimension in its shape") }
                shape.append(d)
            }
            guard let elements = Self.elements(of: shape), elements <= dataLength else {
                throw fail("tensor \"\(name)\" is larger than the file")
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
            tensors[name] = Tensor(dtype: dtype, shape: shape, count: elements, range: (headerEnd + begin)..<(headerEnd + end))
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
        return File(source: source, order: spans.map(\.name), tensors: tensors, metadata: metadata, what: what)
    }

    /// One tensor to write: its `byteCount` bytes are produced by `fill` into one buffer, or
    /// written by `stream` to the file in pieces of its choosing (a copied tensor: memory for
    /// one piece, not the tensor).
    public struct Entry {
        public let name: String
        public let dtype: String
        public let shape: [Int]
        let body: Body

        enum Body {
            case fill((UnsafeMutableRawBufferPointer) throws(LoLDUError) -> Void)
            case stream((AtomicFile.Writer) throws(LoLDUError) -> Void)
        }

        public init(name: String, dtype: String, shape: [Int], fill: @escaping (UnsafeMutableRawBufferPointer) throws(LoLDUError) -> Void) {
            self.init(name: name, dtype: dtype, shape: shape, body: .fill(fill))
        }

        init(name: String, dtype: String, shape: [Int], body: Body) {
            self.name = name
            self.dtype = dtype
            self.shape = shape
            self.body = body
        }

        public var byteCount: Int { (SafeTensors.elements(of: shape) ?? 0) * (SafeTensors.dtypeSizes[dtype] ?? 0) }
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
            switch entry.body {
            case .fill(let fill):
                let buffer = try HeapBuffer<UInt8>(count: entry.byteCount)
                let body = UnsafeMutableRawBufferPointer(start: buffer.pointer, count: entry.byteCount)
                try fill(body)
                try file.write(UnsafeRawBufferPointer(body))
            case .stream(let stream):
                let start = file.offset
                try stream(file)
                guard file.offset - start == entry.byteCount else {
                    throw LoLDUError(.io, "\(file.path): tensor \"\(entry.name)\" wrote \(file.offset - start) bytes of \(entry.byteCount)")
                }
            }
        }
    }
}
