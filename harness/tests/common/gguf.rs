//! A small GGUF reader and rewriter for the tests of bad files: parse a committed fixture's
//! header (metadata and tensor table), change a value, a tensor's offset or the version, and
//! write it back with the tensor data as it was. It trusts its input (the fixtures are good
//! files) and writes whatever it is told to, bad values included: that is its purpose.
#![allow(dead_code)]

/// A metadata value, in GGUF's encoding (type ids 0..12).
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(Vec<u8>),
    /// Element type id, elements.
    Arr(u32, Vec<Val>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Val {
    fn type_id(&self) -> u32 {
        match self {
            Val::U8(_) => 0,
            Val::I8(_) => 1,
            Val::U16(_) => 2,
            Val::I16(_) => 3,
            Val::U32(_) => 4,
            Val::I32(_) => 5,
            Val::F32(_) => 6,
            Val::Bool(_) => 7,
            Val::Str(_) => 8,
            Val::Arr(..) => 9,
            Val::U64(_) => 10,
            Val::I64(_) => 11,
            Val::F64(_) => 12,
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Val::U8(x) => Some(x as u64),
            Val::U16(x) => Some(x as u64),
            Val::U32(x) => Some(x as u64),
            Val::U64(x) => Some(x),
            Val::I32(x) if x >= 0 => Some(x as u64),
            _ => None,
        }
    }

    pub fn array_len(&self) -> Option<usize> {
        match self {
            Val::Arr(_, v) => Some(v.len()),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: innermost first.
    pub dims: Vec<u64>,
    pub ty: u32,
    /// Relative to the data section.
    pub offset: u64,
}

#[derive(Debug, Clone)]
pub struct Gguf {
    pub version: u32,
    pub kv: Vec<(String, Val)>,
    pub tensors: Vec<TensorInfo>,
    /// The padding the header is written with before the data section (the original
    /// alignment, whatever `general.alignment` is changed to).
    pub pad_to: usize,
    /// The data section, as in the original file.
    pub data: Vec<u8>,
}

struct Rd<'a> {
    b: &'a [u8],
    p: usize,
}

impl Rd<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let s = &self.b[self.p..self.p + n];
        self.p += n;
        s
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().unwrap())
    }
    fn str(&mut self) -> Vec<u8> {
        let n = self.u64() as usize;
        self.take(n).to_vec()
    }
    fn val(&mut self, ty: u32) -> Val {
        match ty {
            0 => Val::U8(self.take(1)[0]),
            1 => Val::I8(self.take(1)[0] as i8),
            2 => Val::U16(u16::from_le_bytes(self.take(2).try_into().unwrap())),
            3 => Val::I16(i16::from_le_bytes(self.take(2).try_into().unwrap())),
            4 => Val::U32(self.u32()),
            5 => Val::I32(self.u32() as i32),
            6 => Val::F32(f32::from_bits(self.u32())),
            7 => Val::Bool(self.take(1)[0] != 0),
            8 => Val::Str(self.str()),
            9 => {
                let et = self.u32();
                let n = self.u64();
                Val::Arr(et, (0..n).map(|_| self.val(et)).collect())
            }
            10 => Val::U64(self.u64()),
            11 => Val::I64(self.u64() as i64),
            12 => Val::F64(f64::from_bits(self.u64())),
            t => panic!("fixture has value type {t}"),
        }
    }
}

fn put_val(o: &mut Vec<u8>, v: &Val) {
    match v {
        Val::U8(x) => o.push(*x),
        Val::I8(x) => o.push(*x as u8),
        Val::U16(x) => o.extend(x.to_le_bytes()),
        Val::I16(x) => o.extend(x.to_le_bytes()),
        Val::U32(x) => o.extend(x.to_le_bytes()),
        Val::I32(x) => o.extend(x.to_le_bytes()),
        Val::F32(x) => o.extend(x.to_le_bytes()),
        Val::Bool(x) => o.push(*x as u8),
        Val::Str(s) => {
            o.extend((s.len() as u64).to_le_bytes());
            o.extend(s);
        }
        Val::Arr(et, vs) => {
            o.extend(et.to_le_bytes());
            o.extend((vs.len() as u64).to_le_bytes());
            for v in vs {
                put_val(o, v);
            }
        }
        Val::U64(x) => o.extend(x.to_le_bytes()),
        Val::I64(x) => o.extend(x.to_le_bytes()),
        Val::F64(x) => o.extend(x.to_le_bytes()),
    }
}

impl Gguf {
    pub fn parse(b: &[u8]) -> Gguf {
        assert_eq!(&b[..4], b"GGUF");
        let mut r = Rd { b, p: 4 };
        let version = r.u32();
        let (nt, nkv) = (r.u64(), r.u64());
        let kv = (0..nkv)
            .map(|_| {
                let k = String::from_utf8(r.str()).unwrap();
                let ty = r.u32();
                (k, r.val(ty))
            })
            .collect::<Vec<_>>();
        let tensors = (0..nt)
            .map(|_| {
                let name = String::from_utf8(r.str()).unwrap();
                let nd = r.u32();
                let dims = (0..nd).map(|_| r.u64()).collect();
                TensorInfo { name, dims, ty: r.u32(), offset: r.u64() }
            })
            .collect();
        let pad_to = kv.iter().find(|(k, _)| k == "general.alignment").and_then(|(_, v)| v.as_u64()).unwrap_or(32) as usize;
        let start = r.p.next_multiple_of(pad_to);
        Gguf { version, kv, tensors, pad_to, data: b[start..].to_vec() }
    }

    pub fn read(path: &std::path::Path) -> Gguf {
        Gguf::parse(&std::fs::read(path).unwrap())
    }

    pub fn get(&self, key: &str) -> Option<&Val> {
        self.kv.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Sets (or adds) a metadata value.
    pub fn set(&mut self, key: &str, v: Val) -> &mut Self {
        match self.kv.iter_mut().find(|(k, _)| k == key) {
            Some(e) => e.1 = v,
            None => self.kv.push((key.to_string(), v)),
        }
        self
    }

    pub fn remove(&mut self, key: &str) -> &mut Self {
        self.kv.retain(|(k, _)| k != key);
        self
    }

    pub fn tensor(&self, name: &str) -> &TensorInfo {
        self.tensors.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("no tensor {name}"))
    }

    pub fn tensor_mut(&mut self, name: &str) -> &mut TensorInfo {
        self.tensors.iter_mut().find(|t| t.name == name).unwrap_or_else(|| panic!("no tensor {name}"))
    }

    /// The architecture's key prefix (`llama`).
    pub fn arch(&self) -> String {
        match self.get("general.architecture") {
            Some(Val::Str(s)) => String::from_utf8(s.clone()).unwrap(),
            _ => panic!("no general.architecture"),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut o = b"GGUF".to_vec();
        o.extend(self.version.to_le_bytes());
        o.extend((self.tensors.len() as u64).to_le_bytes());
        o.extend((self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            put_val(&mut o, &Val::Str(k.as_bytes().to_vec()));
            o.extend(v.type_id().to_le_bytes());
            put_val(&mut o, v);
        }
        for t in &self.tensors {
            put_val(&mut o, &Val::Str(t.name.as_bytes().to_vec()));
            o.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                o.extend(d.to_le_bytes());
            }
            o.extend(t.ty.to_le_bytes());
            o.extend(t.offset.to_le_bytes());
        }
        o.resize(o.len().next_multiple_of(self.pad_to), 0);
        o.extend(&self.data);
        o
    }

    pub fn write(&self, path: &std::path::Path) {
        std::fs::write(path, self.to_bytes()).unwrap();
    }
}
