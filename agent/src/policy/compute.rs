//! Computing the datapath policy maps (identities, ipcache, endpoints, policy entries).
