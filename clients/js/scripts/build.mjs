// Builds @gapless/client: dist/index.js (one ESM module, readable), dist/gapless.min.js (the
// same, minified: what `gapless dev` serves, committed so the Rust build needs no Node) and
// the .d.ts types (tsc, which also type-checks the sources).
//   node scripts/build.mjs           build
//   node scripts/build.mjs --check   also fail when the committed dist/gapless.min.js is stale
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as esbuild from 'esbuild';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const check = process.argv.includes('--check');
const committed = (() => {
  try {
    return readFileSync(join(root, 'dist/gapless.min.js'), 'utf8');
  } catch {
    return null;
  }
})();

// Old outputs go, but the committed bundle stays in place until it is rewritten: the Rust
// build embeds it (include_str!), and a cargo build at this moment must still find it.
for (const name of existsSync(join(root, 'dist')) ? readdirSync(join(root, 'dist')) : []) {
  if (name !== 'gapless.min.js') rmSync(join(root, 'dist', name), { recursive: true, force: true });
}
execFileSync(process.execPath, [join(root, 'node_modules/typescript/bin/tsc'), '-p', join(root, 'tsconfig.json')], {
  stdio: 'inherit',
});
const common = {
  entryPoints: [join(root, 'src/index.ts')],
  bundle: true,
  format: 'esm',
  target: ['chrome91', 'firefox90', 'safari15', 'node20'],
  platform: 'neutral',
  legalComments: 'none',
  logLevel: 'warning',
};
await esbuild.build({ ...common, outfile: join(root, 'dist/index.js') });
await esbuild.build({ ...common, outfile: join(root, 'dist/gapless.min.js'), minify: true });

if (check) {
  const built = readFileSync(join(root, 'dist/gapless.min.js'), 'utf8');
  if (committed !== built) {
    console.error('clients/js/dist/gapless.min.js differs from a fresh build of src/: run `npm run build` in clients/js and commit it');
    process.exit(1);
  }
}
