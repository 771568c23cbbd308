// The ES module entry: the same implementation as index.js (CommonJS), re-exported.
import sealer from './index.js';

export const { KINDS, seal, Client, TokenvaultError, VaultUnreachable, version } = sealer;
export default sealer;
