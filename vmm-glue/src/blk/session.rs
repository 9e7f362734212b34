//! One VMM connection's vhost-user state: what was negotiated, guest
//! memory, and the queues, whose kicks are watched by the shared pool
//! ([`super::reactor`]) instead of a thread per queue. The protocol's
//! messages are parsed and answered by the `vhost` crate; this answers
//! what they ask of the device.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Error as ProtoError, GpuBackend, Result as ProtoResult, VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap,
};

use super::backend::{BlkBackend, Memory};
use super::config::QUEUE_SIZE;
use super::reactor::{Reactor, Share, Source, Token, Watch};

/// How many memory regions a VMM may add one by one.
const MAX_MEM_SLOTS: u64 = 509;

struct Mapping {
    vmm_addr: u64,
    size: u64,
    gpa_base: u64,
}

/// A queue's kick, run by the pool.
struct Kick {
    backend: Arc<BlkBackend>,
    vring: VringRwLock,
    index: usize,
    /// Its turn was queued by the pool, not by a kick: the eventfd may
    /// hold nothing, and reading it would block.
    requeued: AtomicBool,
}

impl Source for Kick {
    fn ready(&self) -> Watch {
        // Reading resets the eventfd; requests that came with it are
        // seen by the queue walk.
        if !self.requeued.swap(false, Ordering::Relaxed) {
            let _ = self.vring.read_kick();
        }
        match self.backend.process(self.index, &self.vring) {
            Ok(true) => {
                self.requeued.store(true, Ordering::Relaxed);
                Watch::Requeue
            }
            Ok(false) => Watch::Again,
            Err(e) => {
                tracing::warn!(queue = self.index, "cannot serve the queue: {e}");
                Watch::Again
            }
        }
    }

    fn share(&self) -> Option<Share<'_>> {
        Some(Share {
            vtime: &self.backend.vtime,
            streaming: self.backend.streaming(),
        })
    }
}

pub(crate) struct Session {
    backend: Arc<BlkBackend>,
    reactor: Arc<Reactor>,
    mem: Memory,
    vrings: Vec<VringRwLock>,
    kicks: Vec<Option<Token>>,
    mappings: Vec<Mapping>,
    owned: bool,
    acked_features: u64,
    acked_protocol_features: u64,
}

fn internal(e: impl std::fmt::Display) -> ProtoError {
    ProtoError::ReqHandlerError(io::Error::other(e.to_string()))
}

impl Session {
    pub(crate) fn new(backend: Arc<BlkBackend>, reactor: Arc<Reactor>) -> io::Result<Session> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let queues = backend.num_queues();
        let vrings = (0..queues)
            .map(|_| VringRwLock::new(mem.clone(), QUEUE_SIZE as u16))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Session {
            backend,
            reactor,
            mem,
            vrings,
            kicks: vec![None; queues],
            mappings: Vec::new(),
            owned: false,
            acked_features: 0,
            acked_protocol_features: 0,
        })
    }

    /// Stops watching every queue (the connection ended).
    pub(crate) fn close(&mut self) {
        for index in 0..self.kicks.len() {
            self.unwatch(index);
        }
    }

    fn vring(&self, index: u32) -> ProtoResult<&VringRwLock> {
        self.vrings
            .get(index as usize)
            .ok_or(ProtoError::InvalidParam)
    }

    fn unwatch(&mut self, index: usize) {
        if let Some(token) = self.kicks[index].take() {
            self.reactor.remove(token);
        }
    }

    /// Watches the queue's kick while the queue is started and enabled,
    /// and only then: nothing is served from a stopped ring.
    fn update_watch(&mut self, index: usize) -> ProtoResult<()> {
        let vring = self.vrings[index].clone();
        let (runs, fd) = {
            let state = vring.get_ref();
            let fd = state.get_kick().as_ref().map(|k| k.as_raw_fd());
            (state.get_queue().ready() && state.is_enabled(), fd)
        };
        match (runs, fd) {
            (true, Some(fd)) if self.kicks[index].is_none() => {
                let kick = Arc::new(Kick {
                    backend: self.backend.clone(),
                    vring,
                    index,
                    requeued: AtomicBool::new(false),
                });
                let token = self
                    .reactor
                    .add(fd, kick)
                    .map_err(ProtoError::ReqHandlerError)?;
                self.kicks[index] = Some(token);
            }
            (true, Some(_)) => {}
            _ => self.unwatch(index),
        }
        Ok(())
    }

    /// A queue with a kick descriptor that is not started yet starts now.
    fn start_if_kicked(&mut self, index: usize) -> ProtoResult<()> {
        let needs = {
            let state = self.vrings[index].get_ref();
            !state.get_queue().ready() && state.get_kick().is_some()
        };
        if needs {
            self.vrings[index].set_queue_ready(true);
            self.update_watch(index)?;
        }
        Ok(())
    }

    fn vmm_va_to_gpa(&self, va: u64) -> ProtoResult<u64> {
        self.mappings
            .iter()
            .find(|m| va >= m.vmm_addr && va < m.vmm_addr + m.size)
            .map(|m| va - m.vmm_addr + m.gpa_base)
            .ok_or(ProtoError::InvalidParam)
    }

    fn publish_memory(&mut self, mem: GuestMemoryMmap) -> ProtoResult<()> {
        self.mem.lock().map_err(internal)?.replace(mem);
        self.backend
            .update_memory(self.mem.clone())
            .map_err(ProtoError::ReqHandlerError)
    }
}

impl VhostUserBackendReqHandlerMut for Session {
    fn set_owner(&mut self) -> ProtoResult<()> {
        if self.owned {
            return Err(ProtoError::InvalidOperation("already claimed"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> ProtoResult<()> {
        self.owned = false;
        self.acked_features = 0;
        self.acked_protocol_features = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> ProtoResult<()> {
        for index in 0..self.vrings.len() {
            self.vrings[index].set_enabled(false);
            self.update_watch(index)?;
        }
        self.acked_features = 0;
        Ok(())
    }

    fn get_features(&mut self) -> ProtoResult<u64> {
        Ok(self.backend.features())
    }

    fn set_features(&mut self, features: u64) -> ProtoResult<()> {
        if features & !self.backend.features() != 0 {
            return Err(ProtoError::InvalidParam);
        }
        self.acked_features = features;
        // Without PROTOCOL_FEATURES every ring is enabled at once; with
        // it, SET_VRING_ENABLE says.
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            for index in 0..self.vrings.len() {
                self.vrings[index].set_enabled(true);
                self.update_watch(index)?;
            }
        }
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for vring in &self.vrings {
            vring.set_queue_event_idx(event_idx);
        }
        self.backend.set_event_idx(event_idx);
        self.backend.acked_features(features);
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> ProtoResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening.is_some() {
            return Err(ProtoError::InvalidOperation("postcopy is not supported"));
        }
        let mut regions = Vec::with_capacity(ctx.len());
        let mut mappings = Vec::with_capacity(ctx.len());
        for (region, file) in ctx.iter().zip(files) {
            let guest = GuestRegionMmap::new(
                region.mmap_region(file)?,
                GuestAddress(region.guest_phys_addr),
            )
            .ok_or(ProtoError::InvalidParam)?;
            mappings.push(Mapping {
                vmm_addr: region.user_addr,
                size: region.memory_size,
                gpa_base: region.guest_phys_addr,
            });
            regions.push(guest);
        }
        let mem = GuestMemoryMmap::from_regions(regions).map_err(internal)?;
        self.publish_memory(mem)?;
        self.mappings = mappings;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> ProtoResult<()> {
        if num == 0 || num as usize > QUEUE_SIZE {
            return Err(ProtoError::InvalidParam);
        }
        self.vring(index)?.set_queue_size(num as u16);
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> ProtoResult<()> {
        let desc = self.vmm_va_to_gpa(descriptor)?;
        let avail = self.vmm_va_to_gpa(available)?;
        let used = self.vmm_va_to_gpa(used)?;
        let vring = self.vring(index)?;
        vring
            .set_queue_info(desc, avail, used)
            .map_err(|_| ProtoError::InvalidParam)?;
        // The used index is where the driver left it (after a guest
        // reboot, 0): SET_VRING_BASE restores only the avail side.
        let idx = vring
            .queue_used_idx()
            .map_err(|_| ProtoError::BackendInternalError)?;
        vring.set_queue_next_used(idx);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> ProtoResult<()> {
        self.vring(index)?.set_queue_next_avail(base as u16);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> ProtoResult<VhostUserVringState> {
        let vring = self.vring(index)?.clone();
        // Stopped under the queue's worker lock: a turn under way ends
        // first, and one that starts later finds the ring stopped.
        self.backend
            .stop_queue(index as usize, || vring.set_queue_ready(false));
        self.update_watch(index as usize)?;
        let next_avail = vring.queue_next_avail();
        vring.set_kick(None);
        vring.set_call(None);
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, file: Option<File>) -> ProtoResult<()> {
        let i = usize::from(index);
        self.vring(u32::from(index))?;
        // The old descriptor leaves the pool before it is closed.
        self.unwatch(i);
        self.vrings[i].set_kick(file);
        self.start_if_kicked(i)?;
        self.update_watch(i)
    }

    fn set_vring_call(&mut self, index: u8, file: Option<File>) -> ProtoResult<()> {
        self.vring(u32::from(index))?.set_call(file);
        self.start_if_kicked(usize::from(index))
    }

    fn set_vring_err(&mut self, index: u8, file: Option<File>) -> ProtoResult<()> {
        self.vring(u32::from(index))?.set_err(file);
        Ok(())
    }

    fn get_protocol_features(&mut self) -> ProtoResult<VhostUserProtocolFeatures> {
        Ok(self.backend.protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> ProtoResult<()> {
        self.acked_protocol_features = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> ProtoResult<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> ProtoResult<()> {
        if self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(ProtoError::InactiveFeature(
                VhostUserVirtioFeatures::PROTOCOL_FEATURES,
            ));
        }
        self.vring(index)?.set_enabled(enable);
        self.update_watch(index as usize)
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> ProtoResult<Vec<u8>> {
        Ok(self.backend.get_config(offset, size))
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> ProtoResult<()> {
        self.backend
            .set_config(offset, buf)
            .map_err(ProtoError::ReqHandlerError)
    }

    fn set_gpu_socket(&mut self, _gpu: GpuBackend) -> ProtoResult<()> {
        Err(ProtoError::InvalidOperation("not a GPU"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> ProtoResult<File> {
        Err(ProtoError::InvalidOperation("no shared objects"))
    }

    fn get_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
    ) -> ProtoResult<(VhostUserInflight, File)> {
        Err(ProtoError::InvalidOperation(
            "inflight tracking is not offered",
        ))
    }

    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> ProtoResult<()> {
        Err(ProtoError::InvalidOperation(
            "inflight tracking is not offered",
        ))
    }

    fn get_max_mem_slots(&mut self) -> ProtoResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        file: File,
        postcopy_listening: Option<bool>,
    ) -> ProtoResult<Option<VhostUserMemoryRegionBase>> {
        if postcopy_listening.is_some() {
            return Err(ProtoError::InvalidOperation("postcopy is not supported"));
        }
        let guest = Arc::new(
            GuestRegionMmap::new(
                region.mmap_region(file)?,
                GuestAddress(region.guest_phys_addr),
            )
            .ok_or(ProtoError::InvalidParam)?,
        );
        let mem = self.mem.memory().insert_region(guest).map_err(internal)?;
        self.publish_memory(mem)?;
        self.mappings.push(Mapping {
            vmm_addr: region.user_addr,
            size: region.memory_size,
            gpa_base: region.guest_phys_addr,
        });
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> ProtoResult<()> {
        let (mem, _) = self
            .mem
            .memory()
            .remove_region(GuestAddress(region.guest_phys_addr), region.memory_size)
            .map_err(internal)?;
        self.publish_memory(mem)?;
        self.mappings
            .retain(|m| m.gpa_base != region.guest_phys_addr);
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _file: File,
    ) -> ProtoResult<Option<File>> {
        Err(ProtoError::InvalidOperation(
            "device state transfer is not offered",
        ))
    }

    fn check_device_state(&mut self) -> ProtoResult<()> {
        Err(ProtoError::InvalidOperation(
            "device state transfer is not offered",
        ))
    }

    fn get_shmem_config(&mut self) -> ProtoResult<VhostUserShMemConfig> {
        Err(ProtoError::InvalidOperation("no shared memory regions"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> ProtoResult<()> {
        Err(ProtoError::InvalidOperation("dirty logging is not offered"))
    }
}
