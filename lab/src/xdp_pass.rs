//! A two-instruction XDP program (`return XDP_PASS`) for the underlay's end of each node's
//! `eth0`. The kernel delivers a veth's native `XDP_TX` frames to its peer promptly only
//! when the peer runs an XDP program of its own (veth's flush skips peers without one, and
//! the frames wait in the peer's ring for unrelated traffic). A NIC needs nothing like it:
//! this is the lab's cable, so the agent's native XDP on the node's `eth0` can transmit.
//!
//! Loaded and attached with raw `bpf(2)` calls (the lab has no eBPF toolchain), as a
//! `bpf_link` pinned in the lab's bpffs directory, which the teardown removes.
use std::{ffi::CString, io, os::fd::RawFd, path::Path};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
/// `r0 = 2 (XDP_PASS); exit`.
const PROGRAM: [u64; 2] = [insn(0xb7, 2), insn(0x95, 0)];

/// One `struct bpf_insn` with registers 0 and offset 0, as the little-endian `u64` it is.
const fn insn(code: u8, imm: i32) -> u64 {
    (code as u64) | ((imm as u32 as u64) << 32)
}

/// `bpf(cmd, attr)`: a new file descriptor or the error.
fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> io::Result<RawFd> {
    // SAFETY: `attr` is a zero-padded `union bpf_attr` of the right size for every command
    // used here; the kernel reads at most `attr.len()` bytes.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc as RawFd) }
}

fn put_u32(attr: &mut [u8; 128], off: usize, v: u32) {
    attr[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(attr: &mut [u8; 128], off: usize, v: u64) {
    attr[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}

/// Attaches the pass program to `iface` of the current network namespace (call it inside
/// the netns), pinning the link at `pin`.
pub fn attach(iface: &str, pin: &Path) -> io::Result<()> {
    let name = CString::new(iface).map_err(io::Error::other)?;
    // SAFETY: a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(io::Error::last_os_error());
    }
    let license = c"GPL";
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, BPF_PROG_TYPE_XDP);
    put_u32(&mut attr, 4, PROGRAM.len() as u32);
    put_u64(&mut attr, 8, PROGRAM.as_ptr() as u64);
    put_u64(&mut attr, 16, license.as_ptr() as u64);
    put_u32(&mut attr, 68, BPF_XDP); // expected_attach_type
    let prog = bpf(BPF_PROG_LOAD, &mut attr)?;
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, prog as u32);
    put_u32(&mut attr, 4, ifindex);
    put_u32(&mut attr, 8, BPF_XDP);
    let link = bpf(BPF_LINK_CREATE, &mut attr);
    // SAFETY: our own descriptor; the link holds the program from here on.
    unsafe { libc::close(prog) };
    let link = link?;
    let path = CString::new(pin.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let mut attr = [0u8; 128];
    put_u64(&mut attr, 0, path.as_ptr() as u64);
    put_u32(&mut attr, 8, link as u32);
    let pinned = bpf(BPF_OBJ_PIN, &mut attr);
    // SAFETY: our own descriptor; the pin keeps the link.
    unsafe { libc::close(link) };
    pinned.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_is_return_xdp_pass() {
        // mov64 r0, 2 ; exit, as in the kernel's `struct bpf_insn` (little-endian).
        assert_eq!(PROGRAM[0].to_le_bytes(), [0xb7, 0, 0, 0, 2, 0, 0, 0]);
        assert_eq!(PROGRAM[1].to_le_bytes(), [0x95, 0, 0, 0, 0, 0, 0, 0]);
    }
}
